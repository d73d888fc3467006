"""attention.py against a numpy reference written from the definition, and backend selection."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import phi2_jax.model.attention
from phi2_jax import ConfigError
from phi2_jax.model.attention import attention, resolve_backend


def numpy_attention(q, k, v, kv_mask, segments, q_offset=0):
    """Loop-per-query softmax attention in float64: the definition, nothing shared with the code under test."""
    batch, t_len, heads, dim = q.shape
    groups = heads // k.shape[2]
    out = np.zeros_like(q, dtype=np.float64)
    for b in range(batch):
        for h in range(heads):
            kh = h // groups
            for t in range(t_len):
                visible = [s for s in range(k.shape[1])
                           if s <= t + q_offset and kv_mask[b, s] and segments[b, s] == segments[b, t + q_offset]]
                if not visible:
                    continue
                scores = np.array([q[b, t, h] @ k[b, s, kh] for s in visible]) / np.sqrt(dim)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                out[b, t, h] = sum(pi * v[b, s, kh] for pi, s in zip(p, visible))
    return out


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_xla_backend_equals_numpy_with_padding_and_segments(kv_heads):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 7, 4, 8)).astype(np.float32)
    k = rng.normal(size=(2, 7, kv_heads, 8)).astype(np.float32)
    v = rng.normal(size=(2, 7, kv_heads, 8)).astype(np.float32)
    kv_mask = np.array([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])       # row 1 is left-padded
    segments = np.array([[1, 1, 1, 2, 2, 3, 3], [0, 0, 1, 1, 1, 1, 1]])
    ours = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), backend="xla",
                     kv_mask=jnp.asarray(kv_mask), q_segment_ids=jnp.asarray(segments),
                     kv_segment_ids=jnp.asarray(segments))
    ref = numpy_attention(q, k, v, kv_mask, segments)
    valid = np.array([[1] * 7, [0, 0, 1, 1, 1, 1, 1]], bool)
    np.testing.assert_allclose(np.asarray(ours)[valid], ref[valid], rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(ours)))  # fully masked query rows stay finite


@pytest.mark.parametrize("kv_layout", ["bskd", "heads_flat"])
def test_query_offset_attends_to_a_cache_prefix(kv_layout):
    rng = np.random.default_rng(1)
    q = rng.normal(size=(2, 2, 4, 8)).astype(np.float32)
    k = rng.normal(size=(2, 6, 2, 8)).astype(np.float32)  # two query heads per key/value head
    v = rng.normal(size=(2, 6, 2, 8)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0]])  # slots 4, 5 of the cache not written yet
    # The cache's layout, [B*K, S, D]: row b * K + h holds head h of batch row b.
    k_in, v_in = (x.transpose(0, 2, 1, 3).reshape(4, 6, 8) if kv_layout == "heads_flat" else x for x in (k, v))
    ours = attention(jnp.asarray(q), jnp.asarray(k_in), jnp.asarray(v_in), backend="xla", q_offset=2,
                     kv_mask=jnp.asarray(mask), kv_layout=kv_layout)
    # numpy reference over the 6 slots: query t sits at slot 2 + t
    full_q = np.zeros((2, 6, 4, 8), np.float32)
    full_q[:, 2:4] = q
    ref = numpy_attention(full_q, k, v, mask, np.ones((2, 6), int))[:, 2:4]
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-6)


def test_auto_falls_back_to_xla_on_cpu_and_says_why(caplog, monkeypatch):
    monkeypatch.setattr(phi2_jax.model.attention, "_fallback_reported", set())  # said once per process: maybe already
    with caplog.at_level(logging.INFO, logger="phi2_jax.model.attention"):
        assert resolve_backend("auto", jnp.bfloat16, 80) == "xla"
    assert "the default device is cpu, not a GPU" in caplog.text


def test_forcing_cudnn_on_cpu_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="attention_backend 'cudnn' cannot run here: the default device is cpu"):
        resolve_backend("cudnn", jnp.bfloat16, 80)


def test_causal_blocks_split_long_self_attention_evenly():
    assert [phi2_jax.model.attention.causal_blocks(t) for t in (100, 255, 256, 384, 1024, 2048, 1000)] == [1, 1, 2, 3, 8, 8, 5]


def test_causal_query_blocks_equal_numpy_and_unblocked_gradients(monkeypatch):
    """Self-attention split into query blocks (each seeing only the keys up to its end) is the same function."""
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(2, 12, 4, 8)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(2, 12, 2, 8)).astype(np.float32))
    v = jnp.asarray(rng.normal(size=(2, 12, 2, 8)).astype(np.float32))
    kv_mask = np.array([[1] * 12, [0] * 3 + [1] * 9])
    segments = np.array([[1] * 5 + [2] * 7, [0] * 3 + [1] * 4 + [2] * 5])
    cotangent = jnp.asarray(rng.normal(size=q.shape).astype(np.float32) * kv_mask[:, :, None, None])

    def run(q, k, v):
        return attention(q, k, v, backend="xla", kv_mask=jnp.asarray(kv_mask), q_segment_ids=jnp.asarray(segments),
                         kv_segment_ids=jnp.asarray(segments))

    def grads():  # padded rows' outputs are implementation-defined, so they get a zero cotangent
        return jax.grad(lambda *qkv: jnp.sum(run(*qkv) * cotangent), argnums=(0, 1, 2))(q, k, v)

    unblocked = grads()
    monkeypatch.setattr(phi2_jax.model.attention, "CAUSAL_BLOCK_ROWS", 2)
    assert phi2_jax.model.attention.causal_blocks(12) == 6
    valid = kv_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(run(q, k, v))[valid], numpy_attention(
        *(np.asarray(x) for x in (q, k, v)), kv_mask, segments)[valid], rtol=1e-5, atol=1e-6)
    for blocked, reference in zip(grads(), unblocked):
        np.testing.assert_allclose(np.asarray(blocked), np.asarray(reference), rtol=1e-5, atol=1e-6)
