"""The Flax model against transformers' PhiForCausalLM (an independent implementation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import phi2_jax
from phi2_jax.hf.layout import hf_names_and_shapes
from phi2_jax.hf.loading import our_shapes
from tests.hf_reference import reference_logits

# Four configs that differ in rotary fraction, qk_layernorm, head count, GQA, vocab size and config dialect.
PARITY_CONFIGS = {
    "v5_half_rotary": dict(dialect="5.x", vocab_size=100, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, partial_rotary_factor=0.5),
    "v4_qk_layernorm": dict(dialect="4.x", vocab_size=77, hidden_size=40, intermediate_size=96,
                            num_hidden_layers=3, num_attention_heads=2, partial_rotary_factor=0.4, qk_layernorm=True),
    "msft_full_rotary": dict(dialect="msft", layout="phi-msft", vocab_size=120, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=8, partial_rotary_factor=1.0),
    "v5_gqa": dict(dialect="5.x", vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=6, num_key_value_heads=2, partial_rotary_factor=0.5),
}


def rel_err(ours, ref):
    return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("name", PARITY_CONFIGS)
def test_float32_logits_equal_transformers(hf_folder, name):
    folder, reference = hf_folder(name, **PARITY_CONFIGS[name])
    model = phi2_jax.from_pretrained(folder)
    vocab = reference.config.vocab_size
    ids = np.random.default_rng(0).integers(0, vocab, (3, 11))
    ref = reference_logits(reference, ids)
    logits = model(ids)
    assert logits.dtype == jnp.float32 and logits.shape == (3, 11, vocab)
    assert rel_err(logits, ref) < 1e-5


@pytest.mark.parametrize("name, length", [("v5_gqa", 9), ("msft_full_rotary", 9), ("v5_gqa", 257)],
                         ids=["v5_gqa", "msft_full_rotary", "v5_gqa-causal-blocks"])
def test_float32_gradients_equal_transformers_autograd(hf_folder, name, length):
    """Every parameter's gradient of the next-token loss against torch autograd through PhiForCausalLM.

    At 256 positions the xla attention splits the queries into causal blocks (see attention.py).
    """
    import torch

    from phi2_jax.model.attention import causal_blocks
    from phi2_jax.hf.layout import flatten, iter_hf_tensors
    from phi2_jax.training.step import cross_entropy

    assert (causal_blocks(length - 1) > 1) == (length > 256)
    folder, reference = hf_folder(name, **PARITY_CONFIGS[name])
    model = phi2_jax.from_pretrained(folder)
    ids = np.random.default_rng(3).integers(0, reference.config.vocab_size, (2, length))
    graphdef, params = nnx.split(model)

    def loss(p):
        return cross_entropy(nnx.merge(graphdef, p)(ids[:, :-1]), ids[:, 1:])[0]

    grads = jax.grad(loss)(params)
    ours = {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(grads)).items()}
    ours = dict(iter_hf_tensors(model.config, "transformers", ours))
    reference.zero_grad()
    tids = torch.from_numpy(ids)
    logits = reference(tids[:, :-1]).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tids[:, 1:].reshape(-1)).backward()
    theirs = {name: p.grad.numpy() for name, p in reference.named_parameters()}
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert rel_err(ours[key], value) < 1e-5, key


def test_bfloat16_compute_within_bf16_rounding(hf_folder):
    # bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2%). Rounding of
    # inputs, weights and the residual stream compounds over the matmuls of each
    # layer; 3% of the largest logit bounds it for these 2-3 layer models while
    # any real bug (wrong rotary, wrong norm) is off by order 100%.
    folder, reference = hf_folder("v4_qk_layernorm", **PARITY_CONFIGS["v4_qk_layernorm"])
    model = phi2_jax.from_pretrained(folder, compute_dtype="bfloat16")
    ids = np.random.default_rng(1).integers(0, 77, (2, 16))
    logits = model(ids)
    assert logits.dtype == jnp.float32  # logits stay float32 whatever the compute dtype
    err = rel_err(logits, reference_logits(reference, ids))
    assert 1e-5 < err < 3e-2  # really ran in bf16, and within bf16 rounding


def test_padded_batches_match_each_row_alone(hf_folder):
    folder, reference = hf_folder("v5_half_rotary", **PARITY_CONFIGS["v5_half_rotary"])
    model = phi2_jax.from_pretrained(folder)
    rng = np.random.default_rng(2)
    rows = [rng.integers(0, 100, n) for n in (9, 5, 2)]
    width = 9
    for side in ("right", "left"):
        ids = np.zeros((3, width), np.int32)
        mask = np.zeros((3, width), np.int32)
        for r, row in enumerate(rows):
            sl = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
            ids[r, sl], mask[r, sl] = row, 1
        padded = np.asarray(model(ids, attention_mask=mask))
        for r, row in enumerate(rows):
            alone = reference_logits(reference, row[None])[0]
            sl = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
            assert rel_err(padded[r, sl], alone) < 1e-5, (side, r)
            assert np.all(np.isfinite(padded[r]))  # padded positions: any value, but never NaN


def test_right_padded_batch_equals_transformers_with_mask(hf_folder):
    folder, reference = hf_folder("v5_gqa", **PARITY_CONFIGS["v5_gqa"])
    model = phi2_jax.from_pretrained(folder)
    ids = np.random.default_rng(3).integers(0, 64, (2, 8))
    mask = np.array([[1] * 8, [1] * 5 + [0] * 3])
    ref = reference_logits(reference, ids, mask)
    ours = np.asarray(model(ids, attention_mask=mask))
    assert rel_err(ours[0], ref[0]) < 1e-5
    assert rel_err(ours[1, :5], ref[1, :5]) < 1e-5


def test_segment_ids_isolate_packed_documents(hf_folder):
    folder, reference = hf_folder("v5_half_rotary", **PARITY_CONFIGS["v5_half_rotary"])
    model = phi2_jax.from_pretrained(folder)
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, 100, 6), rng.integers(0, 100, 4)
    packed = np.concatenate([a, b])[None]
    segments = np.array([[1] * 6 + [2] * 4])
    logits = np.asarray(model(packed, segment_ids=segments))  # positions restart at each document
    assert rel_err(logits[0, :6], reference_logits(reference, a[None])[0]) < 1e-5
    assert rel_err(logits[0, 6:], reference_logits(reference, b[None])[0]) < 1e-5


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_remat_policies_change_memory_not_maths(remat):
    config = phi2_jax.preset("nano")
    plain = phi2_jax.create_model(config, seed=3)
    remat_model = phi2_jax.create_model(config.replace(remat=remat), seed=3)
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 128, (2, 8)))

    def loss(model):
        return model(ids).astype(jnp.float32).mean()

    g_plain = nnx.grad(loss)(plain)
    g_remat = nnx.grad(loss)(remat_model)
    for x, y in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_dropout_is_off_without_rng_and_on_with_it():
    config = phi2_jax.preset("nano", resid_pdrop=0.5, embd_pdrop=0.5)
    model = phi2_jax.create_model(config)
    ids = np.arange(8)[None] % 128
    base = np.asarray(model(ids))
    np.testing.assert_array_equal(base, np.asarray(model(ids)))
    one = np.asarray(model(ids, dropout_rng=jax.random.key(0)))
    again = np.asarray(model(ids, dropout_rng=jax.random.key(0)))
    other = np.asarray(model(ids, dropout_rng=jax.random.key(1)))
    np.testing.assert_array_equal(one, again)
    assert not np.allclose(one, base) and not np.allclose(one, other)


# Shapes from ../shared/PHI2_SPEC.md (torch layout, [out, in]).
PHI2_HF_SHAPES = {
    "model.embed_tokens.weight": (51200, 2560),
    "model.layers.{i}.input_layernorm.weight": (2560,), "model.layers.{i}.input_layernorm.bias": (2560,),
    **{f"model.layers.{{i}}.self_attn.{p}.weight": (2560, 2560) for p in ("q_proj", "k_proj", "v_proj", "dense")},
    **{f"model.layers.{{i}}.self_attn.{p}.bias": (2560,) for p in ("q_proj", "k_proj", "v_proj", "dense")},
    "model.layers.{i}.mlp.fc1.weight": (10240, 2560), "model.layers.{i}.mlp.fc1.bias": (10240,),
    "model.layers.{i}.mlp.fc2.weight": (2560, 10240), "model.layers.{i}.mlp.fc2.bias": (2560,),
    "model.final_layernorm.weight": (2560,), "model.final_layernorm.bias": (2560,),
    "lm_head.weight": (51200, 2560), "lm_head.bias": (51200,),
}


def test_full_phi2_shapes_by_eval_shape_only():
    config = phi2_jax.preset("phi-2")
    model = phi2_jax.abstract_model(config)  # ShapeDtypeStructs: no 11 GB allocation
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert sum(int(np.prod(x.shape)) for x in leaves) == 2_779_683_840
    hf = hf_names_and_shapes(config, "transformers", our_shapes(config))
    assert len(hf) == 453
    expected = {}
    for template, shape in PHI2_HF_SHAPES.items():
        for i in range(32) if "{i}" in template else [None]:
            expected[template.format(i=i)] = shape
    assert hf == expected
    assert sum(int(np.prod(s)) for s in hf.values()) == 2_779_683_840
    # the forward pass traces at full size too
    out = jax.eval_shape(lambda m, ids: m(ids), model, jax.ShapeDtypeStruct((1, 2048), jnp.int32))
    assert out.shape == (1, 2048, 51200) and out.dtype == jnp.float32


@pytest.mark.parametrize("weight_grad", ["native", "transposed"])
@pytest.mark.parametrize("d_in,d_out", [(8, 24), (24, 8)])  # both ways the weight gradient transposes an operand
@pytest.mark.parametrize("dtype,out_dtype", [("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16")])
def test_dense_gradients_equal_the_closed_form(d_in, d_out, dtype, out_dtype, weight_grad):
    """Float32 master weights, matmuls in `dtype`: the weight gradient comes back in float32, unrounded."""
    from phi2_jax.model.dense import dense

    rng = np.random.default_rng(0)
    x, w, dy = (rng.standard_normal(s).astype(np.float32) for s in [(2, 5, d_in), (d_in, d_out), (2, 5, d_out)])
    x_c, w32 = jnp.asarray(x, dtype), jnp.asarray(w)
    y, pullback = jax.vjp(lambda a, b: dense(a, b, dtype, out_dtype, weight_grad), x_c, w32)
    dx, dw = pullback(jnp.asarray(dy, out_dtype))
    x64, w64 = (np.asarray(jnp.asarray(a, dtype), np.float64) for a in (x, w))
    dy64 = np.asarray(jnp.asarray(dy, out_dtype), np.float64)  # dy arrives in the output dtype, unrounded
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert y.dtype == jnp.dtype(out_dtype) and dx.dtype == x_c.dtype and dw.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y, np.float64), x64 @ w64, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(dx, np.float64), dy64 @ w64.T, rtol=tol, atol=tol)
    # Products of bfloat16 operands are exact in float32 and summed in float32: only summation order differs,
    # where a bfloat16 result would be off by ~1e-2 relative.
    np.testing.assert_allclose(np.asarray(dw, np.float64), np.einsum("bti,bto->io", x64, dy64), rtol=1e-5, atol=1e-5)


def test_forward_mode_autodiff_through_the_model_equals_finite_differences():
    """jax.jvp of the logits along a direction in embedding space equals a central finite difference."""
    config = phi2_jax.preset("nano")
    model = phi2_jax.create_model(config, seed=1)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 128, (1, 6)))
    graphdef, state = nnx.split(model)
    direction = jax.tree.map(lambda a: jnp.asarray(0.01 * np.random.default_rng(4).standard_normal(a.shape), a.dtype), state)

    def logits(s):
        return nnx.merge(graphdef, s)(ids)

    _, tangent = jax.jvp(logits, (state,), (direction,))
    eps = 1e-2
    plus = logits(jax.tree.map(lambda a, d: a + eps * d, state, direction))
    minus = logits(jax.tree.map(lambda a, d: a - eps * d, state, direction))
    finite = (plus - minus) / (2 * eps)
    np.testing.assert_allclose(np.asarray(tangent), np.asarray(finite), rtol=2e-2, atol=2e-3)
    assert float(jnp.abs(tangent).max()) > 1e-2  # the direction moves the logits: the comparison means something
    # jax.jacfwd along the same line through parameter space gives the same tangent.
    along = jax.jacfwd(lambda s: logits(jax.tree.map(lambda a, d: a + s * d, state, direction)))(0.0)
    np.testing.assert_allclose(np.asarray(along), np.asarray(tangent), rtol=1e-5, atol=1e-6)
