"""Capture and intervention: shapes, consistency with the logits, patching, and transformers' attention maps."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import pytest
import torch

import phi2_jax
from phi2_jax.model.interpret import Edits, logit_lens

CFG = dict(dialect="5.x", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
           num_attention_heads=4, partial_rotary_factor=0.5)


@pytest.fixture(scope="module")
def setup(hf_folder):
    folder, reference = hf_folder("interpret", **CFG)
    return reference, phi2_jax.from_pretrained(folder)


def test_capture_shapes_and_the_last_residual_gives_the_logits(setup):
    _, model = setup
    ids = np.random.default_rng(0).integers(0, 100, (2, 9))
    logits, acts = model(ids, capture=["residual", "attn_probs", "mlp_act", "attn_out", "mlp_out"])
    assert acts["residual"].shape == (3, 2, 9, 32) and acts["attn_out"].shape == (3, 2, 9, 32)
    assert acts["mlp_act"].shape == (3, 2, 9, 64) and acts["attn_probs"].shape == (3, 2, 4, 9, 9)
    np.testing.assert_allclose(np.asarray(acts["attn_probs"]).sum(-1), 1.0, rtol=1e-5)
    lens = logit_lens(model, acts["residual"])
    np.testing.assert_allclose(np.asarray(lens[-1]), np.asarray(logits), rtol=1e-5, atol=1e-5)


def test_attention_probabilities_equal_transformers(setup):
    reference, model = setup
    ids = np.random.default_rng(1).integers(0, 100, (1, 7))
    _, acts = model(ids, capture=["attn_probs", "residual"])
    reference.config._attn_implementation = "eager"
    with torch.no_grad():
        out = reference(torch.tensor(ids), output_attentions=True, output_hidden_states=True)
    for layer in range(3):
        np.testing.assert_allclose(np.asarray(acts["attn_probs"][layer]), out.attentions[layer].numpy(), rtol=1e-4, atol=1e-6)
        if layer < 2:  # transformers' last hidden state is after the final LayerNorm
            np.testing.assert_allclose(np.asarray(acts["residual"][layer]), out.hidden_states[layer + 1].numpy(),
                                       rtol=1e-4, atol=1e-5)


def test_patching_with_its_own_activation_changes_nothing(setup):
    _, model = setup
    ids = np.random.default_rng(2).integers(0, 100, (1, 8))
    logits, acts = model(ids, capture=["residual"])
    edits = Edits(model.config, batch=1, length=8).replace(layer=1, position=4, value=acts["residual"][1, 0, 4])
    np.testing.assert_allclose(np.asarray(model(ids, edits=edits.arrays())), np.asarray(logits), rtol=1e-6, atol=1e-6)


def test_patching_another_prompt_changes_exactly_the_downstream_positions(setup):
    _, model = setup
    rng = np.random.default_rng(3)
    clean, corrupt = rng.integers(0, 100, (1, 8)), rng.integers(0, 100, (1, 8))
    base = np.asarray(model(clean))
    _, acts = model(corrupt, capture=["residual"])
    edits = Edits(model.config, batch=1, length=8).replace(layer=0, position=3, value=acts["residual"][0, 0, 3])
    patched = np.asarray(model(clean, edits=edits.arrays()))
    np.testing.assert_array_equal(patched[0, :3], base[0, :3])  # causal: earlier positions cannot see it
    assert all(not np.allclose(patched[0, p], base[0, p]) for p in range(3, 8))


def test_steering_works_under_jit_and_on_a_sharded_model(setup, hf_folder):
    _, model = setup
    ids = np.random.default_rng(4).integers(0, 100, (4, 6))
    vector = np.random.default_rng(5).normal(size=32).astype(np.float32)
    edits = Edits(model.config, batch=4, length=6).add(layer=2, vector=vector).arrays()
    eager = np.asarray(model(ids, edits=edits))
    jitted = np.asarray(jax.jit(lambda m_ids, e: model(m_ids, edits=e))(ids, edits))
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)
    # adding the vector after the last layer shifts the final residual by exactly that vector
    _, acts = model(ids, capture=["residual"])
    _, steered = model(ids, capture=["residual"], edits=edits)
    np.testing.assert_allclose(np.asarray(steered["residual"][2] - acts["residual"][2]),
                               np.broadcast_to(vector, (4, 6, 32)), atol=1e-5)
    folder, _ = hf_folder("interpret", **CFG)
    sharded = phi2_jax.from_pretrained(folder, mesh=phi2_jax.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    logits, sharded_acts = sharded(ids, capture=["residual"], edits=edits)
    np.testing.assert_allclose(np.asarray(logits), eager, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(sharded_acts["residual"]), np.asarray(steered["residual"]), rtol=1e-5, atol=1e-5)


def test_unknown_capture_name_is_refused(setup):
    _, model = setup
    with pytest.raises(ValueError, match=r"cannot capture \['resid'\]; expected some of residual"):
        model(np.ones((1, 3), int), capture=["resid"])


@pytest.mark.parametrize("fuse", [False, True])
def test_decoding_layer_copies_give_the_scan_s_logits_and_cache(setup, fuse, monkeypatch):
    """inference/decoding's unrolled (and fused) layer copies compute what the model's scanned layers do."""
    from phi2_jax.inference import decoding

    _, model = setup
    monkeypatch.setattr(decoding, "can_fuse_input_projections", lambda m: fuse)
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 100, (2, 6)))
    mask = jnp.ones((2, 8), jnp.int32).at[:, 6:].set(0)
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    layers = decoding.layer_copies(model)
    assert isinstance(nnx.merge(layers[0], layers[1][0]), decoding.FusedInputLayer) == fuse
    for layout in ("bskd", "heads_flat"):
        scanned = decoding.decode_forward(model, None, ids, mask, positions, model.init_cache(2, 8, layout=layout), 0)
        unrolled = decoding.decode_forward(model, layers, ids, mask, positions,
                                           model.init_cache(2, 8, layout=layout, per_layer=True), 0)
        np.testing.assert_allclose(np.asarray(unrolled[0]), np.asarray(scanned[0]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(unrolled[1].k[1]), np.asarray(scanned[1].k[1]), rtol=1e-5, atol=1e-6)
        # Both equal the plain forward pass's last position.
        np.testing.assert_allclose(np.asarray(scanned[0]), np.asarray(model(ids))[:, -1], rtol=1e-5, atol=1e-5)