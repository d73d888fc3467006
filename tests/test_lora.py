"""LoRA: a fresh adapter is a no-op, merging is exact, only adapters train, exports are merged."""

import numpy as np
import pytest
from flax import nnx
from transformers import PhiForCausalLM

import phi2_jax
from phi2_jax import ConfigError
from phi2_jax.hf.convert import main as convert
from phi2_jax.hf.convert import save_pretrained
from phi2_jax.hf.layout import flatten, unflatten
from phi2_jax.model.lora import merge_adapters
from tests import train_runs
from tests.hf_reference import reference_logits

CFG = dict(dialect="5.x", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, partial_rotary_factor=0.5, max_position_embeddings=128)
ALL = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")


def with_random_b(model):
    """The same model with non-zero adapters B (a trained adapter)."""
    graphdef, state = nnx.split(model)
    flat = flatten(nnx.to_pure_dict(state))
    rng = np.random.default_rng(0)
    flat = {k: (rng.normal(0, 0.3, v.shape).astype(np.float32) if k.endswith("lora_b") else v) for k, v in flat.items()}
    return nnx.merge(graphdef, unflatten(flat))


def test_fresh_adapters_leave_the_model_unchanged(hf_folder):
    folder, _ = hf_folder("lora", **CFG)
    ids = np.random.default_rng(0).integers(0, 512, (2, 10))
    base = np.asarray(phi2_jax.from_pretrained(folder)(ids))
    adapted = phi2_jax.from_pretrained(folder, lora_rank=4, lora_targets=ALL)
    assert adapted.layers.mlp.fc1.lora_a.get_value().shape == (2, 32, 4)
    np.testing.assert_array_equal(np.asarray(adapted(ids)), base)


def test_merged_equals_unmerged_and_exports_merged(hf_folder, tmp_path):
    folder, _ = hf_folder("lora", **CFG)
    adapted = with_random_b(phi2_jax.from_pretrained(folder, lora_rank=4, lora_alpha=8.0, lora_targets=ALL))
    ids = np.random.default_rng(1).integers(0, 512, (2, 10))
    unmerged = np.asarray(adapted(ids))
    assert not np.allclose(unmerged, np.asarray(phi2_jax.from_pretrained(folder)(ids)))  # the adapter matters
    merged_params = merge_adapters(flatten(nnx.to_pure_dict(nnx.state(adapted))), adapted.config)
    plain = phi2_jax.abstract_model(adapted.config.replace(lora_rank=0))
    merged = nnx.merge(nnx.split(plain)[0], unflatten(merged_params))
    np.testing.assert_allclose(np.asarray(merged(ids)), unmerged, rtol=1e-5, atol=1e-5)
    save_pretrained(adapted, tmp_path / "hf")
    exported = PhiForCausalLM.from_pretrained(tmp_path / "hf").eval()
    np.testing.assert_allclose(reference_logits(exported, ids), unmerged, rtol=1e-4, atol=1e-4)


def test_lora_training_moves_only_adapters_and_exports_merged(hf_folder, tmp_path):
    folder, reference = hf_folder("lora", **CFG)
    run_dir = tmp_path / "run"
    train_runs.run(run_dir, f"checkpoint.init_from={folder}", "train.steps=6", "model.lora_rank=4",
                   "model.lora_targets=[q_proj, v_proj, fc1]", "optim.lr=1e-2", "checkpoint.every=6")
    trained = train_runs.final_params(run_dir, 6)
    base = phi2_jax.from_pretrained(folder)
    for path, value in flatten(nnx.to_pure_dict(nnx.state(base))).items():
        np.testing.assert_array_equal(trained[path], np.asarray(value), err_msg=path)  # frozen
    assert np.abs(trained["layers/mlp/fc1/lora_b"]).max() > 0  # adapters trained
    assert "layers/mlp/fc2/lora_b" not in trained
    import orbax.checkpoint as ocp
    opt = ocp.StandardCheckpointer().metadata((run_dir / "checkpoints" / "6" / "opt_state").absolute())
    opt_paths = flatten_meta(opt)
    assert any(p.endswith("mu/layers/mlp/fc1/lora_b") for p in opt_paths)
    assert not [p for p in opt_paths if "kernel" in p or "embed" in p or "bias" in p]  # none for base weights
    convert(["to-hf", str(run_dir), str(tmp_path / "hf"), "--dtype", "float32"])
    exported = PhiForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = phi2_jax.from_pretrained(run_dir)
    ids = np.random.default_rng(2).integers(0, 512, (1, 12))
    np.testing.assert_allclose(reference_logits(exported, ids), np.asarray(ours(ids)), rtol=1e-4, atol=1e-4)


def flatten_meta(tree, prefix=""):
    tree = getattr(tree, "item_metadata", tree)
    tree = getattr(tree, "tree", tree)
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in flatten_meta(v, f"{prefix}/{k}")]
    if isinstance(tree, (list, tuple)):
        return [p for i, v in enumerate(tree) for p in flatten_meta(v, f"{prefix}/{i}")]
    return [prefix]


def test_unknown_lora_target_is_refused():
    with pytest.raises(ConfigError, match=r"lora_targets has 'out_proj'; expected some of q_proj, k_proj"):
        phi2_jax.preset("nano", lora_rank=4, lora_targets=("out_proj",))


def test_decoding_with_adapters_on_the_fused_projections_keeps_them(hf_folder):
    """Layer copies for decoding fuse q/k/v/fc1 only without adapters there; adapted decoding equals the scan's."""
    from phi2_jax.inference.decoding import can_fuse_input_projections
    from phi2_jax.inference.generate import generate

    folder, _ = hf_folder("lora", **CFG)
    assert can_fuse_input_projections(phi2_jax.from_pretrained(folder, lora_rank=4, lora_targets=("dense", "fc2")))
    adapted = with_random_b(phi2_jax.from_pretrained(folder, lora_rank=4, lora_alpha=8.0, lora_targets=ALL))
    assert not can_fuse_input_projections(adapted)
    ids = np.random.default_rng(2).integers(0, 512, (2, 5))
    copies = generate(adapted, ids, max_new_tokens=8, eos_token_id=-1, copy_layers=True)
    np.testing.assert_array_equal(copies, generate(adapted, ids, max_new_tokens=8, eos_token_id=-1, copy_layers=False))
