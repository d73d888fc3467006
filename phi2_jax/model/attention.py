"""Scaled dot-product attention with a plain-XLA backend and a cuDNN fused backend.

Shapes: B batch, T query length, S key length, N query heads, K key/value heads
(N a multiple of K), D head dim.

Masking is expressed by slot indices so that the same function serves training
(T == S), prefill and KV-cache decoding (queries at slots `q_offset + t` of an
S-slot cache):
  * causal: query slot i sees key slots j <= i;
  * `kv_mask` [B, S]: False for padding (and unfilled cache) slots;
  * `q_segment_ids` [B, T] / `kv_segment_ids` [B, S]: packed documents never
    attend across each other.
A query row with no visible key (a left-padding position) yields garbage but
finite values: padded outputs are implementation-defined, and NaNs there would
poison gradients through the sum.

The xla backend splits long causal self-attention into query blocks that skip
the keys the causal mask hides (`causal_blocks`), as flash attention does.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from jax._src.cudnn import fused_attention_stablehlo as cudnn_fused_attention
from jax._src.cudnn.fused_attention_stablehlo import MaskType
from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_dot_product_attention

from phi2_jax.errors import ConfigError

log = logging.getLogger(__name__)

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_fallback_reported: set[str] = set()


def attention_mask(
    batch: int,
    q_len: int,
    kv_len: int,
    *,
    q_offset: jax.Array | int = 0,
    kv_mask: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Boolean [B, 1, T, S] mask, True where a query may attend to a key."""
    q_slot = jnp.arange(q_len)[:, None] + jnp.asarray(q_offset)
    kv_slot = jnp.arange(kv_len)[None, :]
    mask = jnp.broadcast_to((kv_slot <= q_slot)[None, None], (batch, 1, q_len, kv_len))
    if kv_mask is not None:
        mask = mask & kv_mask.astype(bool)[:, None, None, :]
    if q_segment_ids is not None or kv_segment_ids is not None:
        assert q_segment_ids is not None and kv_segment_ids is not None, "pass both segment id arrays"
        mask = mask & (q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :])
    return mask


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, kv_layout: str = "bskd") -> jax.Array:
    """Reference attention in jnp: scores and softmax in float32, output in q's dtype.

    q [B, T, N, D], k/v [B, S, K, D] (kv_layout 'bskd') or [B*K, S, D] ('heads_flat'),
    mask [B, 1, T, S] -> [B, T, N, D].
    """
    kv_flat = kv_layout == "heads_flat"
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[0] // batch if kv_flat else k.shape[2]
    groups = num_heads // num_kv_heads
    # Heads-major: the G query heads sharing a key/value head (head n uses kv head n // G, as transformers'
    # repeat_kv) are stacked along the query axis, [B, K, G*T, D] against [B, K, S, D]. k and v are never
    # repeated, and both einsums are plain batched matmuls, faster on XLA:CPU in both passes than the
    # [B, T, K, G, D] form this replaced (measured: docs/benchmarks.md, "Attention: heads-major form").
    q = q.reshape(batch, q_len, num_kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    q = q.reshape(batch, num_kv_heads, groups * q_len, head_dim)
    rows = (batch, num_kv_heads, groups * q_len)
    if kv_flat:
        # The cache is read as stored, [B*K, S, D]: reshaping it to [B, K, S, D] makes XLA fuse its in-place
        # update into both readers and copy the cache at every decoding step. (Training keeps the 4-d form:
        # this one's backward pass is slower there. Measured: docs/benchmarks.md, "Decoding: the CPU KV-cache layout".)
        scores = jnp.einsum("nqd,nsd->nqs", q.reshape(-1, *q.shape[2:]), k, preferred_element_type=jnp.float32)
        scores = scores.reshape(*rows, -1)
    else:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        scores = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / jnp.sqrt(jnp.float32(head_dim)))
    if groups > 1:
        mask = jnp.tile(mask, (1, 1, groups, 1))  # [B, 1, G*T, S], query rows ordered (g, t) like q's
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if kv_flat:
        out = jnp.einsum("nqs,nsd->nqd", probs.reshape(-1, *probs.shape[2:]), v, preferred_element_type=jnp.float32)
        out = out.reshape(*rows, head_dim)
    else:
        out = jnp.einsum("bkqs,bksd->bkqd", probs, v, preferred_element_type=jnp.float32)
    out = out.reshape(batch, num_kv_heads, groups, q_len, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)


CAUSAL_BLOCK_ROWS = 128  # smaller query blocks lose more to small dots than they save (XLA:CPU, 4 x 256 tokens)


def causal_blocks(q_len: int) -> int:
    """How many query blocks the xla backend splits causal self-attention over T tokens into (at most 8)."""
    blocks = min(8, q_len // CAUSAL_BLOCK_ROWS)
    while blocks > 1 and q_len % blocks:
        blocks -= 1
    return max(blocks, 1)


def attention_probs(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """Float32 attention probabilities [B, N, T, S] (for inspection; the xla backend's softmax)."""
    batch, q_len, num_heads, head_dim = q.shape
    k = jnp.repeat(k, num_heads // k.shape[2], axis=2)
    scores = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(head_dim))
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def cudnn_supported(dtype, head_dim: int) -> tuple[bool, str]:
    """Whether cuDNN fused attention can run, and if not, why (one phrase).

    The GPU is judged by JAX's own cuDNN capability check, which a deviceless compile for a
    GPU target answers for that target (training/dry_run.py): no GPU is asked for then.
    """
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _CUDNN_DTYPES]:
        return False, f"compute dtype {jnp.dtype(dtype).name} is not bfloat16/float16"
    if head_dim % 8 or head_dim > 256:
        return False, f"head_dim {head_dim} is not a multiple of 8 up to 256"
    try:
        if cudnn_fused_attention.check_compute_capability("8.0"):
            return True, ""
    except (RuntimeError, ValueError):
        pass
    try:
        device = jax.devices()[0]
    except RuntimeError:
        return False, "no JAX devices"
    if device.platform != "gpu":
        return False, f"the default device is {device.platform}, not a GPU"
    return False, f"GPU compute capability {getattr(device, 'compute_capability', '?')} is below 8.0 (sm80)"


def resolve_backend(backend: str, dtype, head_dim: int) -> str:
    """Maps 'auto' to 'cudnn' or 'xla' (logging the reason for a fallback once); checks 'cudnn'."""
    if backend == "xla":
        return "xla"
    ok, why = cudnn_supported(dtype, head_dim)
    if backend == "cudnn":
        if not ok:
            raise ConfigError(f"attention_backend 'cudnn' cannot run here: {why}; use 'auto' or 'xla'.")
        return "cudnn"
    assert backend == "auto", backend
    if ok:
        return "cudnn"
    if why not in _fallback_reported:
        _fallback_reported.add(why)
        log.info("attention: using the xla backend because %s", why)
    return "xla"


def cudnn_packs_documents() -> bool:
    """Whether cuDNN's packed layout (documents as offsets and lengths) runs here: JAX allows it from sm90 on.

    Asked through JAX's own check, which a deviceless compile for a GPU target answers for that target
    (training/dry_run.py).
    """
    try:
        return bool(cudnn_fused_attention.check_compute_capability("9.0"))
    except (RuntimeError, ValueError):
        return False


def packed_segments(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cuDNN's description of packed documents: (offsets [B, T+1], lengths [B, T]), -1 where unused.

    Row b's m-th document starts at offsets[b, m] and has lengths[b, m] tokens. A row of T tokens holds at
    most T documents, so T slots are always enough (a static shape, whatever the data).
    """
    batch, length = segment_ids.shape
    index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    starts = jnp.concatenate([jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    slot = jnp.where(starts, jnp.cumsum(starts, axis=1) - 1, length)  # non-starts go to the spare last slot
    rows = jnp.arange(batch)[:, None]
    offsets = jnp.full((batch, length + 1), -1, jnp.int32).at[rows, slot].set(index).at[:, length].set(-1)
    following = jnp.concatenate([offsets[:, 1:], jnp.full((batch, 1), -1, jnp.int32)], axis=1)
    ends = jnp.where(following >= 0, following, length)
    lengths = jnp.where(offsets >= 0, ends - offsets, -1)[:, :length]
    return offsets, lengths


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    backend: str = "auto",
    q_offset: jax.Array | int = 0,
    kv_mask: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    kv_layout: str = "bskd",
) -> jax.Array:
    """Causal attention. q [B, T, N, D], k/v [B, S, K, D] -> [B, T, N, D] in q's dtype.

    `backend`: 'xla' (plain jnp, the reference and CPU path), 'cudnn' (fused
    flash attention, bf16/fp16 on sm80+), or 'auto' (cuDNN where supported).
    kv_layout: 'heads_flat' when k/v come as [B*K, S, D] (the KV cache's XLA:CPU layout).
    """
    batch, q_len, _, head_dim = q.shape
    kv_len = k.shape[1]
    self_attention = kv_layout == "bskd" and isinstance(q_offset, int) and q_offset == 0 and q_len == kv_len
    chosen = resolve_backend(backend, q.dtype, head_dim)
    if chosen == "cudnn" and self_attention:  # training and prefill; decoding's few query rows stay on xla
        if kv_mask is None and q_segment_ids is None:
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        if kv_mask is None and q_segment_ids is kv_segment_ids and cudnn_packs_documents():
            offsets, lengths = packed_segments(q_segment_ids)
            return cudnn_dot_product_attention(q, k, v, None, None, lengths, lengths, offsets, offsets,
                                               scale=float(head_dim) ** -0.5, mask_type=MaskType.PADDING_CAUSAL)
        # Padding (batched scoring of prompts of several lengths), or packed documents before Hopper: a mask,
        # which cuDNN takes as a dense bias.
        mask = attention_mask(batch, q_len, kv_len, kv_mask=kv_mask, q_segment_ids=q_segment_ids,
                              kv_segment_ids=kv_segment_ids)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    mask = attention_mask(batch, q_len, kv_len, q_offset=q_offset, kv_mask=kv_mask,
                          q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    blocks = causal_blocks(q_len) if self_attention else 1
    if blocks == 1:
        return xla_attention(q, k, v, mask, kv_layout)
    # Query block i sees only keys [0, (i + 1) * rows): the causal mask hides the rest, so their scores are
    # never computed (a quarter to almost half of attention's work, as flash attention skips those tiles).
    rows = q_len // blocks
    return jnp.concatenate([
        xla_attention(q[:, i * rows:(i + 1) * rows], k[:, :(i + 1) * rows], v[:, :(i + 1) * rows],
                      mask[:, :, i * rows:(i + 1) * rows, :(i + 1) * rows])
        for i in range(blocks)], axis=1)
