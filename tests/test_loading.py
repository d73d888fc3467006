"""from_pretrained on Hugging Face folders: sharded files, stored dtypes, and every way a folder can be broken."""

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import phi2_jax
from phi2_jax import WeightsError
from tests.hf_reference import reference_logits

SMALL = dict(dialect="5.x", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, partial_rotary_factor=0.5)


def test_sharded_safetensors_with_index_loads_exactly(hf_folder):
    folder, reference = hf_folder("sharded", max_shard_size="20KB", **SMALL)
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    ids = np.random.default_rng(0).integers(0, 100, (2, 6))
    np.testing.assert_allclose(np.asarray(phi2_jax.from_pretrained(folder)(ids)), reference_logits(reference, ids),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_half_precision_files_load_as_transformers_upcasts_them(hf_folder, tmp_path, stored):
    folder, _ = hf_folder("small", **SMALL)
    weights = {k: v.to(stored) for k, v in load_file(folder / "model.safetensors").items()}
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    from transformers import PhiForCausalLM
    reference = PhiForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = np.random.default_rng(1).integers(0, 100, (1, 6))
    model = phi2_jax.from_pretrained(tmp_path)
    np.testing.assert_allclose(np.asarray(model(ids)), reference_logits(reference, ids), rtol=1e-5, atol=1e-5)
    bf16 = phi2_jax.from_pretrained(tmp_path, dtype="bfloat16")
    assert bf16.layers.mlp.fc1.kernel.get_value().dtype == np.dtype(ml_dtypes.bfloat16)


def _copy(folder, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def _edit_weights(target, edit):
    weights = load_file(target / "model.safetensors")
    edit(weights)
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})


def test_missing_folder_and_missing_files(tmp_path):
    with pytest.raises(WeightsError, match=r"nowhere does not exist; expected a Hugging Face model folder"):
        phi2_jax.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(WeightsError, match=r"has neither config.json nor an Orbax checkpoint; expected a Hugging Face model folder"):
        phi2_jax.from_pretrained(tmp_path)


def test_folder_without_weights(hf_folder, tmp_path):
    target = _copy(hf_folder("small", **SMALL)[0], tmp_path)
    (target / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"holds no weights; expected model.safetensors, model.safetensors.index.json"):
        phi2_jax.from_pretrained(target)


def test_truncated_safetensors(hf_folder, tmp_path):
    target = _copy(hf_folder("small", **SMALL)[0], tmp_path)
    data = (target / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"model.safetensors: tensor '.*' ends at byte \d+ of a \d+-byte data section; the file is truncated"):
        phi2_jax.from_pretrained(target)
    (target / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(WeightsError, match=r"model.safetensors has a header that is not valid JSON"):
        phi2_jax.from_pretrained(target)


def test_missing_unexpected_and_misshapen_tensors(hf_folder, tmp_path):
    source = hf_folder("small", **SMALL)[0]
    target = _copy(source, tmp_path)
    _edit_weights(target, lambda w: w.pop("model.layers.1.mlp.fc2.bias"))
    with pytest.raises(WeightsError, match=r"is missing tensor 'model.layers.1.mlp.fc2.bias' \(1 missing in all\)"):
        phi2_jax.from_pretrained(target)

    shutil.rmtree(target)
    target = _copy(source, tmp_path)
    _edit_weights(target, lambda w: w.update({"model.layers.2.mlp.fc1.bias": torch.zeros(64)}))
    with pytest.raises(WeightsError, match=r"has unexpected tensor 'model.layers.2.mlp.fc1.bias'"):
        phi2_jax.from_pretrained(target)

    shutil.rmtree(target)
    target = _copy(source, tmp_path)
    _edit_weights(target, lambda w: w.update({"model.layers.0.mlp.fc1.weight": torch.zeros(32, 64)}))
    with pytest.raises(WeightsError, match=r"tensor 'model.layers.0.mlp.fc1.weight' has shape \[32, 64\] but config.json implies \[64, 32\]"):
        phi2_jax.from_pretrained(target)


def test_index_naming_a_missing_shard(hf_folder, tmp_path):
    target = _copy(hf_folder("sharded", max_shard_size="20KB", **SMALL)[0], tmp_path)
    shard = sorted(target.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(WeightsError, match=rf"names shard {shard.name} for '.*', but .* does not exist"):
        phi2_jax.from_pretrained(target)


def test_unknown_model_type_in_config(hf_folder, tmp_path):
    target = _copy(hf_folder("small", **SMALL)[0], tmp_path)
    hf = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**hf, "model_type": "gpt2"}))
    with pytest.raises(phi2_jax.ConfigError, match=r"has model_type 'gpt2'; expected 'phi'"):
        phi2_jax.from_pretrained(target)
