"""Capture and intervention: shapes, consistency with the logits, patching, and transformers' attention maps."""

import jax
import numpy as np
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
def test_unrolled_layers_give_the_scan_s_logits_captures_and_edits(setup, fuse):
    _, model = setup
    ids = np.random.default_rng(5).integers(0, 100, (2, 6))
    edits = Edits(model.config, batch=2, length=6).add(layer=1, vector=np.linspace(-1, 1, 32)).arrays()
    names = ("residual", "attn_probs", "mlp_act")
    scanned = model.run(ids, capture=names, edits=edits)
    layer_weights = model.unstack_layers(fuse_input_projections=fuse)
    assert ("input_projection" in layer_weights[0]) == fuse
    unrolled = model.run(ids, capture=names, edits=edits, layer_weights=layer_weights)
    for got, want in zip(jax.tree.leaves(unrolled["captures"]) + [unrolled["logits"]],
                         jax.tree.leaves(scanned["captures"]) + [scanned["logits"]]):
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
