"""The converter CLI: exact round trips, files transformers loads, streaming shards, and every bad input."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file, save_file
from transformers import PhiForCausalLM

import phi2_jax
from phi2_jax.hf.convert import main
from tests.hf_reference import reference_logits

SMALL = dict(dialect="5.x", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, partial_rotary_factor=0.5)
MSFT = dict(dialect="msft", layout="phi-msft", vocab_size=96, hidden_size=48, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, partial_rotary_factor=0.5)


def convert(*args):
    main([str(a) for a in args])


def reference_tensors(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name,spec", [("small", SMALL), ("msft", MSFT)])
def test_round_trip_is_bit_exact_in_float32(hf_folder, tmp_path, name, spec):
    folder, reference = hf_folder(name, **spec)
    convert("from-hf", folder, tmp_path / "ckpt")
    convert("to-hf", tmp_path / "ckpt", tmp_path / "hf", "--dtype", "float32")
    exported = load_numpy(tmp_path / "hf" / "model.safetensors")
    expected = reference_tensors(reference)  # transformers names, whatever the input layout
    assert exported.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(exported[key], expected[key], err_msg=key)


def test_export_loads_in_transformers_with_the_same_logits(hf_folder, tmp_path):
    folder, reference = hf_folder("msft", **MSFT)
    convert("from-hf", folder, tmp_path / "ckpt")
    convert("to-hf", tmp_path / "ckpt", tmp_path / "hf", "--dtype", "float32")
    loaded, info = PhiForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = np.random.default_rng(0).integers(0, 96, (2, 7))
    np.testing.assert_array_equal(reference_logits(loaded.eval(), ids), reference_logits(reference, ids))
    ours = phi2_jax.from_pretrained(tmp_path / "ckpt")
    np.testing.assert_allclose(np.asarray(ours(ids)), reference_logits(reference, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_half_precision_export_matches_torch_cast(hf_folder, tmp_path, dtype, torch_dtype):
    folder, reference = hf_folder("small", **SMALL)
    convert("from-hf", folder, tmp_path / "ckpt")
    convert("to-hf", tmp_path / "ckpt", tmp_path / "hf", "--dtype", dtype)
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    for key, value in reference.state_dict().items():
        assert exported[key].dtype == torch_dtype
        assert torch.equal(exported[key], value.to(torch_dtype)), key
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == dtype


def test_bfloat16_checkpoint_round_trips_through_bfloat16(hf_folder, tmp_path):
    folder, reference = hf_folder("small", **SMALL)
    convert("from-hf", folder, tmp_path / "ckpt", "--dtype", "bfloat16")
    convert("to-hf", tmp_path / "ckpt", tmp_path / "hf", "--dtype", "bfloat16")
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    for key, value in reference.state_dict().items():
        assert torch.equal(exported[key], value.to(torch.bfloat16)), key


def test_float16_source_is_stored_as_is_and_restores_as_exact_float32(hf_folder, tmp_path, capsys):
    folder, reference = hf_folder("small", **SMALL)
    half = tmp_path / "fp16"
    copy.deepcopy(reference).to(torch.float16).save_pretrained(half)  # the fixture's model is shared
    half_tensors = load_file(half / "model.safetensors")
    convert("from-hf", half, tmp_path / "ckpt")
    assert "float32; stored as float16" in capsys.readouterr().out
    convert("inspect", tmp_path / "ckpt")
    out = capsys.readouterr().out
    assert "stored as: ['float16']" in out and "restores as: float32" in out
    model = phi2_jax.from_pretrained(tmp_path / "ckpt")
    fc1 = model.layers.mlp.fc1.kernel.get_value()
    assert fc1.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(fc1[1]),
                                  half_tensors["model.layers.1.mlp.fc1.weight"].float().numpy().T)
    convert("to-hf", tmp_path / "ckpt", tmp_path / "hf", "--dtype", "float16")
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert exported.keys() == half_tensors.keys()
    for key, value in half_tensors.items():
        assert torch.equal(exported[key], value), key
    # a bfloat16 target cannot hold float16 exactly, so it is stored as asked
    convert("from-hf", half, tmp_path / "ckpt-bf16", "--dtype", "bfloat16")
    assert "bfloat16; stored as bfloat16" in capsys.readouterr().out


def test_sharded_export_round_trips(hf_folder, tmp_path):
    folder, reference = hf_folder("sharded", max_shard_size="20KB", **SMALL)
    convert("from-hf", folder, tmp_path / "ckpt")
    convert("to-hf", tmp_path / "ckpt", tmp_path / "hf", "--dtype", "float32", "--max-shard-size", "30KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / "hf" / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in reference.state_dict().values())
    for shard in shards:
        assert load_file(tmp_path / "hf" / shard) is not None
        from safetensors import safe_open
        with safe_open(tmp_path / "hf" / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
    loaded, info = PhiForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # and back in again, from the sharded export
    convert("from-hf", tmp_path / "hf", tmp_path / "ckpt2")
    ids = np.random.default_rng(1).integers(0, 100, (1, 5))
    np.testing.assert_array_equal(np.asarray(phi2_jax.from_pretrained(tmp_path / "ckpt2")(ids)),
                                  np.asarray(phi2_jax.from_pretrained(tmp_path / "ckpt")(ids)))


def test_tokenizer_files_are_copied_and_pytorch_bin_is_read_safely(hf_folder, tmp_path):
    folder, reference = hf_folder("small", **SMALL)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save(reference.state_dict(), bin_dir / "pytorch_model.bin")
    shutil.copy(folder / "config.json", bin_dir / "config.json")
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "special_tokens_map.json").write_text("{}")
    convert("from-hf", bin_dir, tmp_path / "ckpt")
    convert("to-hf", tmp_path / "ckpt", tmp_path / "hf", "--dtype", "float32", "--tokenizer", tok)
    assert (tmp_path / "hf" / "tokenizer.json").is_file() and (tmp_path / "hf" / "special_tokens_map.json").is_file()
    exported = load_numpy(tmp_path / "hf" / "model.safetensors")
    for key, value in reference_tensors(reference).items():
        np.testing.assert_array_equal(exported[key], value)


def test_sharded_restore_of_a_converted_checkpoint(hf_folder, tmp_path):
    folder, _ = hf_folder("small", **SMALL)
    convert("from-hf", folder, tmp_path / "ckpt")
    mesh = phi2_jax.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = phi2_jax.from_pretrained(tmp_path / "ckpt", mesh=mesh)
    kernel = sharded.layers.mlp.fc1.kernel.get_value()
    assert {s.data.shape for s in kernel.addressable_shards} == {(2, 16, 32)}
    ids = np.random.default_rng(2).integers(0, 100, (4, 6))
    np.testing.assert_allclose(np.asarray(sharded(ids)), np.asarray(phi2_jax.from_pretrained(folder)(ids)),
                               rtol=1e-5, atol=1e-5)


def test_inspect_reads_headers_only(hf_folder, tmp_path, capsys):
    folder, reference = hf_folder("msft", **MSFT)
    convert("inspect", folder)
    out = capsys.readouterr().out
    assert "layout: phi-msft" in out and f"parameters: {sum(p.numel() for p in reference.parameters()):,}" in out
    convert("from-hf", folder, tmp_path / "ckpt")
    capsys.readouterr()
    convert("inspect", tmp_path / "ckpt")
    assert "phi2_jax Orbax checkpoint" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bad input
def _broken(folder, tmp_path, how):
    target = tmp_path / "broken"
    shutil.copytree(folder, target)
    weights = target / "model.safetensors"
    if how == "no weights":
        weights.unlink()
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "corrupt":
        weights.write_bytes(b"\xff" * 64)
    elif how in ("missing tensor", "unexpected tensor", "wrong shape"):
        tensors = load_file(weights)
        if how == "missing tensor":
            tensors.pop("lm_head.bias")
        elif how == "unexpected tensor":
            tensors["model.layers.0.mlp.fc3.weight"] = torch.zeros(2)
        else:
            tensors["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(32, 31)
        save_file(tensors, weights, metadata={"format": "pt"})
    elif how == "unknown model_type":
        config = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps({**config, "model_type": "phi3"}))
    return target


BAD = {
    "no weights": r"holds no weights; expected model.safetensors",
    "truncated": r"ends at byte \d+ of a \d+-byte data section; the file is truncated",
    "corrupt": r"declares a \d+-byte header in a 64-byte file; it is truncated or not a safetensors file",
    "missing tensor": r"is missing tensor 'lm_head.bias'",
    "unexpected tensor": r"has unexpected tensor 'model.layers.0.mlp.fc3.weight'",
    "wrong shape": r"tensor 'model.layers.1.self_attn.q_proj.weight' has shape \[32, 31\] but config.json implies \[32, 32\]",
    "unknown model_type": r"has model_type 'phi3'; expected 'phi'",
}


def _assert_refused(capsys, args, pattern, dest):
    capsys.readouterr()  # drop what building the fixture printed
    with pytest.raises(SystemExit) as exit_info:
        convert(*args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert __import__("re").search(pattern, err), err
    assert not dest.exists()
    if dest.parent.exists():
        assert not [p for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.")]  # no staging left


@pytest.mark.parametrize("how", BAD)
def test_bad_hf_folders_are_refused_and_leave_nothing(hf_folder, tmp_path, capsys, how):
    folder, _ = hf_folder("small", **SMALL)
    dest = tmp_path / "out" / "ckpt"
    _assert_refused(capsys, ["from-hf", _broken(folder, tmp_path, how), dest], BAD[how], dest)


def test_missing_folder_and_index_naming_a_missing_shard(hf_folder, tmp_path, capsys):
    dest = tmp_path / "out" / "ckpt"
    _assert_refused(capsys, ["from-hf", tmp_path / "nowhere", dest], r"nowhere does not exist", dest)
    folder, _ = hf_folder("sharded", max_shard_size="20KB", **SMALL)
    target = tmp_path / "sharded"
    shutil.copytree(folder, target)
    sorted(target.glob("model-*.safetensors"))[0].unlink()
    _assert_refused(capsys, ["from-hf", target, dest], r"names shard model-00001-of-\d+.safetensors for '.*', but", dest)


def test_non_empty_destination_needs_overwrite(hf_folder, tmp_path, capsys):
    folder, _ = hf_folder("small", **SMALL)
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit):
        convert("from-hf", folder, dest)
    assert "is not empty; choose a new folder or pass --overwrite" in capsys.readouterr().err
    assert (dest / "precious.txt").read_text() == "keep me"
    convert("from-hf", folder, dest, "--overwrite")
    assert not (dest / "precious.txt").exists() and (dest / "params").is_dir()
    # a failing overwrite leaves the previous good output untouched
    broken = _broken(folder, tmp_path, "truncated")
    with pytest.raises(SystemExit):
        convert("from-hf", broken, dest, "--overwrite")
    assert (dest / "params").is_dir() and phi2_jax.from_pretrained(dest) is not None


# ----------------------------------------------------------------------------- config.json and arguments
def _edit_config(folder, tmp_path, edit):
    target = tmp_path / "edited"
    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    edited = edit(config)
    (target / "config.json").write_bytes(edited if isinstance(edited, bytes) else json.dumps(config).encode())
    return target


CONFIGS = {
    "number as a string": ("small", lambda c: c.update(hidden_size="32"),
                           r"config.json gives 'hidden_size' as \"32\" \(a string\); expected an integer\."),
    "float as a string": ("small", lambda c: c["rope_parameters"].update(rope_theta="10000.0"),
                          r"config.json gives 'rope_parameters.rope_theta' as \"10000.0\" \(a string\); expected a number\."),
    "boolean for a size": ("small", lambda c: c.update(num_hidden_layers=True),
                           r"gives 'num_hidden_layers' as true \(a boolean\); expected an integer\."),
    "zero heads": ("small", lambda c: c.update(num_attention_heads=0, num_key_value_heads=0),
                   r"num_attention_heads must be a positive integer, got 0\."),
    "msft zero heads": ("msft", lambda c: c.update(n_head=0), r"config.json has n_head 0; expected a positive integer\."),
    "msft number as a string": ("msft", lambda c: c.update(n_embd="48"),
                                r"config.json gives 'n_embd' as \"48\" \(a string\); expected an integer\."),
    "msft heads not dividing": ("msft", lambda c: c.update(n_head=5),
                                r"has n_embd 48, not divisible by n_head 5; expected a multiple"),
    "not UTF-8": ("small", lambda c: b"\xff\xfe" + json.dumps(c).encode("utf-16-le"),
                  r"config.json is not UTF-8 text \(byte 0\); expected a JSON config.json\."),
    "empty eos list": ("small", lambda c: c.update(eos_token_id=[]),
                       r"gives 'eos_token_id' as an empty list; expected an id or a list of ids\."),
    "rope_parameters a list": ("small", lambda c: c.update(rope_parameters=[1]),
                               r"gives 'rope_parameters' as \[1\]; expected an object\."),
}


@pytest.mark.parametrize("how", CONFIGS)
def test_bad_config_json_is_one_sentence(hf_folder, tmp_path, capsys, how):
    name, edit, pattern = CONFIGS[how]
    folder, _ = hf_folder(name, **{"small": SMALL, "msft": MSFT}[name])
    target = _edit_config(folder, tmp_path, edit)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    dest = tmp_path / "out" / "ckpt"
    _assert_refused(capsys, ["from-hf", target, dest], pattern, dest)
    _assert_refused(capsys, ["inspect", target], pattern, dest)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


@pytest.mark.parametrize("size,pattern", [
    ("0", r"--max-shard-size '0' is 0 bytes; expected a positive size, e.g. 2GB\."),
    ("-1GB", r"--max-shard-size '-1GB' is -1000000000 bytes; expected a positive size"),
    ("0.1B", r"--max-shard-size '0.1B' is 0 bytes"),
    ("infGB", r"--max-shard-size 'infGB' is not a size; expected e.g. 2GB, 500MB or 1000000\."),
    ("lots", r"--max-shard-size 'lots' is not a size"),
])
def test_max_shard_size_must_be_positive(hf_folder, tmp_path, capsys, size, pattern):
    folder, _ = hf_folder("small", **SMALL)
    convert("from-hf", folder, tmp_path / "ckpt")
    dest = tmp_path / "hf"
    _assert_refused(capsys, ["to-hf", tmp_path / "ckpt", dest, f"--max-shard-size={size}"], pattern, dest)


def _garble(folder):
    for file in folder.rglob("*"):
        if file.is_file():
            file.write_bytes(b"garbage")


@pytest.mark.parametrize("part", ["params", "meta"])
def test_to_hf_from_a_damaged_checkpoint_is_one_sentence(hf_folder, tmp_path, capsys, part):
    folder, _ = hf_folder("small", **SMALL)
    convert("from-hf", folder, tmp_path / "ckpt")
    _garble(tmp_path / "ckpt" / part)
    dest = tmp_path / "hf"
    pattern = rf"{tmp_path / 'ckpt'} could not be restored \(\w+: .*\); the checkpoint is damaged\.$"
    _assert_refused(capsys, ["to-hf", tmp_path / "ckpt", dest], pattern, dest)
    if part == "meta":  # inspect reads only the metadata
        _assert_refused(capsys, ["inspect", tmp_path / "ckpt"], pattern, dest)
