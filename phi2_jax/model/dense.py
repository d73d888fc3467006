"""The linear layers' matmul: y = x @ kernel, with float32 weight gradients from low-precision operands.

`dense(x, kernel, ...)` takes the kernel in its parameter dtype (float32 master
weights) and multiplies in the compute dtype. Its gradient with respect to the
kernel comes out in float32, from bfloat16 operands with float32 accumulation:
plain autodiff of `x @ kernel.astype(bfloat16)` would round the weight gradient
to bfloat16 (the transpose of a dot returns its operand's dtype) before the cast
back to float32.

Two weight-gradient forms, chosen by `PhiConfig.weight_grad`:
  'native'      a custom JVP: its tangent reads the float32 kernel tangent
                directly, so the transposed dot has a float32 result; forward-mode
                autodiff (`jax.jvp`, `jax.jacfwd`) works. Every backend.
  'transposed'  a custom VJP that transposes one operand of the weight-gradient
                dot into a fresh array first, which XLA:CPU then runs at its
                forward matmul speed (docs/benchmarks.md, "Training: the
                transposed weight gradient"). Chosen by the trainer
                and the bench on the CPU backend only; it blocks forward mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Low-precision dots state their algorithm, so that the dots autodiff derives from them (which mix a float32
# cotangent with a bfloat16 operand) still run as bfloat16 GEMMs with float32 accumulation on a GPU.
_ALGORITHMS = {jnp.dtype(jnp.bfloat16): jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
               jnp.dtype(jnp.float16): jax.lax.DotAlgorithmPreset.F16_F16_F32}


def dense(x: jax.Array, kernel: jax.Array, compute_dtype, out_dtype, weight_grad: str = "native") -> jax.Array:
    """x [..., in] @ kernel [in, out] -> [..., out] in `out_dtype`; the product runs in `compute_dtype`."""
    compute_dtype, out_dtype = jnp.dtype(compute_dtype), jnp.dtype(out_dtype)
    x = x.astype(compute_dtype)
    if weight_grad == "transposed":
        return _dense_transposed_weight_grad(x, kernel, compute_dtype, out_dtype)
    return _dense(x, kernel, compute_dtype, out_dtype)


def _matmul(x, kernel, compute_dtype, result_dtype=jnp.float32):
    """x @ kernel accumulated in float32, with the operands' algorithm stated for low-precision compute."""
    return jnp.einsum("...i,io->...o", x, kernel, preferred_element_type=result_dtype,
                      precision=_ALGORITHMS.get(compute_dtype))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _dense(x, kernel, compute_dtype, out_dtype):
    return _matmul(x, kernel.astype(compute_dtype), compute_dtype, out_dtype)


@_dense.defjvp
def _dense_jvp(compute_dtype, out_dtype, primals, tangents):
    (x, kernel), (dx, dkernel) = primals, tangents
    kernel_c = kernel.astype(compute_dtype)  # what is all-gathered and multiplied: the compute-dtype copy
    # The primal product comes out in the output dtype: it is what remat's save_dots policy keeps, and a
    # float32 copy would double those saved activations.
    y = _matmul(x, kernel_c, compute_dtype, out_dtype)
    # The kernel's tangent enters in its own (float32) dtype, so the transposed dot returns float32.
    dy = _matmul(dx, kernel_c, compute_dtype) + _matmul(x, dkernel, compute_dtype)
    return y, dy.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense_transposed_weight_grad(x, kernel, compute_dtype, out_dtype):
    return _matmul(x, kernel.astype(compute_dtype), compute_dtype).astype(out_dtype)


def _forward(x, kernel, compute_dtype, out_dtype):
    return _dense_transposed_weight_grad(x, kernel, compute_dtype, out_dtype), (x, kernel)


def _backward(compute_dtype, out_dtype, residuals, dy):
    x, kernel = residuals
    # dy comes in the output dtype (float32 for the lm_head's logits even in bfloat16 compute); the dots
    # promote like the einsum's own autodiff and accumulate in float32.
    kernel_c = kernel.astype(compute_dtype)
    dx = jnp.einsum("...o,io->...i", dy, kernel_c, preferred_element_type=jnp.float32).astype(x.dtype)
    rows, d_in, d_out = dy.size // dy.shape[-1], x.shape[-1], dy.shape[-1]
    x2, dy2 = x.reshape(rows, d_in), dy.reshape(rows, d_out)
    # The weight gradient's dot contracts the token axis, the leading axis of both operands: XLA:CPU runs that
    # slower than a forward matmul of the same size, but at full speed with the smaller operand transposed
    # into a fresh array first (the barrier keeps XLA from folding the transpose back). Measured:
    # docs/benchmarks.md, "Training: the transposed weight gradient".
    if d_in <= d_out:
        dw = jnp.matmul(jax.lax.optimization_barrier(x2.T), dy2, preferred_element_type=jnp.float32)
    else:
        dw = jnp.matmul(jax.lax.optimization_barrier(dy2.T), x2, preferred_element_type=jnp.float32).T
    return dx, dw.astype(kernel.dtype)


_dense_transposed_weight_grad.defvjp(_forward, _backward)
