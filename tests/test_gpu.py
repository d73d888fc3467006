"""What only a GPU can show: cuDNN fused attention held to the xla backend, forward and backward.

Skipped where JAX has no GPU (CI, the dev CPU); `launch/gpu_check.sh` runs these
first on a lent GPU. The xla backend is itself held to a numpy reference in
test_attention.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi2_jax.model.attention import attention, cudnn_supported

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")

PHI2_HEADS, PHI2_HEAD_DIM = 32, 80  # phi-2's attention shape: 32 heads of 80 dims


def _qkv(batch: int, length: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=(batch, length, PHI2_HEADS, PHI2_HEAD_DIM)), jnp.bfloat16) for _ in range(3)]


def test_cudnn_runs_at_phi2_head_dim_in_bfloat16():
    ok, why = cudnn_supported(jnp.bfloat16, PHI2_HEAD_DIM)
    assert ok, why


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "left-padded"])
def test_cudnn_attention_equals_xla_forward_and_backward(padded):
    q, k, v = _qkv(2, 256)
    valid = np.array([[1] * 256, [0] * 40 + [1] * 216] if padded else [[1] * 256] * 2, bool)
    kv_mask = jnp.asarray(valid) if padded else None
    # Padding rows see no key at all, where backends may differ (uniform weights, or zeros): a zero
    # cotangent there keeps them out of every gradient, and their outputs are not compared.
    cotangent = np.random.default_rng(1).normal(size=q.shape) * valid[:, :, None, None]
    cotangent = jnp.asarray(cotangent, jnp.float32)

    def loss(q, k, v, backend):
        out = attention(q, k, v, backend=backend, kv_mask=kv_mask)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    results = {}
    for backend in ("cudnn", "xla"):
        step = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
        (dq, dk, dv), out = step(q, k, v, backend)
        results[backend] = [np.asarray(x, np.float32) for x in (out[valid], dq, dk, dv)]
    for name, fused, reference in zip(("out", "dq", "dk", "dv"), results["cudnn"], results["xla"]):
        # bfloat16 keeps 8 bits of mantissa, and the two backends round in different places.
        np.testing.assert_allclose(fused, reference, atol=2e-2 * np.abs(reference).max(), rtol=0, err_msg=name)
