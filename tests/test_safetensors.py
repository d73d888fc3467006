"""What we read from a weights folder is what its files say: hostile headers, odd dtypes, escaping shard paths,
non-finite values. Every file here is built byte by byte (tests/raw_safetensors.py), not with our own writer."""

import json
import re
import shutil

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

import phi2_jax
from phi2_jax import ConfigError, WeightsError
from phi2_jax.hf.convert import main
from phi2_jax.hf.files import count_nonfinite
from phi2_jax.hf.safetensors_io import SafetensorsFile
from tests.raw_safetensors import raw_file, read_header, tensors_file

SMALL = dict(dialect="5.x", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, partial_rotary_factor=0.5)
BIAS = "model.layers.0.input_layernorm.bias"


def _two(tmp_path, edit):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16)}
    return tensors_file(tmp_path / "t.safetensors", tensors, edit)


def test_a_well_formed_file_reads_back_what_the_reference_reader_reads(tmp_path):
    path = _two(tmp_path, None)
    ours, reference = SafetensorsFile(path), load_file(path)
    assert ours.keys() == ["a", "b"]
    for name in reference:
        np.testing.assert_array_equal(ours.read(name), reference[name])
        assert ours.read(name).dtype == reference[name].dtype


def _offsets(a, b):
    def edit(header):
        header["a"]["data_offsets"], header["b"]["data_offsets"] = a, b
    return edit


HOSTILE = {
    "negative offset": (_offsets([-24, 0], [24, 32]),
                        r"tensor 'a' has data_offsets \[-24, 0\]; expected non-negative integers \[begin, end\]"),
    "begin after end": (_offsets([24, 0], [24, 32]), r"tensor 'a' has data_offsets \[24, 0\]"),
    "float offset": (_offsets([0.0, 24.0], [24, 32]), r"tensor 'a' has data_offsets \[0.0, 24.0\]"),
    "boolean offset": (_offsets([False, 24], [24, 32]), r"tensor 'a' has data_offsets \[False, 24\]"),
    "overlap": (_offsets([0, 24], [16, 24]), r"tensor 'b' \(bytes 16-24\) overlaps tensor 'a' \(which ends at byte 24\)"),
    "trailing bytes": (lambda h: h["b"].update(shape=[2], data_offsets=[24, 28]),
                       r"has 4 bytes after its last tensor; expected the data section to end at byte 28"),
    "wrong size": (_offsets([0, 20], [20, 28]), r"tensor 'a' claims 20 bytes for shape \[2, 3\] of F32"),
    "past the end": (_offsets([0, 24], [32, 40]), r"tensor 'b' ends at byte 40 of a 32-byte data section"),
    "unknown dtype": (lambda h: h["b"].update(dtype="F8_E4M3"),
                      r"tensor 'b' has dtype 'F8_E4M3', which this reader does not know; expected one of F64, F32"),
    "negative shape": (lambda h: h["b"].update(shape=[-4]), r"tensor 'b' has shape \[-4\]; expected non-negative"),
    "entry not an object": (lambda h: h.update(b=[1, 2]), r"tensor 'b' has a malformed header entry \[1, 2\]"),
}


@pytest.mark.parametrize("how", HOSTILE)
def test_hostile_headers_are_refused(tmp_path, how):
    edit, pattern = HOSTILE[how]
    with pytest.raises(WeightsError, match=pattern):
        SafetensorsFile(_two(tmp_path, edit))


def test_overlapping_and_trailing_bytes_messages(tmp_path):
    a, b = np.zeros(4, np.float32), np.zeros(2, np.float32)
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    with pytest.raises(WeightsError, match=r"tensor 'b' \(bytes 8-16\) overlaps tensor 'a' \(which ends at byte 16\)"):
        SafetensorsFile(raw_file(tmp_path / "o.safetensors", header, a.tobytes()))
    header["b"]["data_offsets"] = [16, 24]
    with pytest.raises(WeightsError, match=r"has 8 bytes after its last tensor; expected the data section to end at byte 24"):
        SafetensorsFile(raw_file(tmp_path / "t.safetensors", header, a.tobytes() + b.tobytes() + b"\0" * 8))
    header["b"]["data_offsets"] = [24, 32]
    with pytest.raises(WeightsError, match=r"bytes 16-24 of the data section belong to no tensor \(before 'b'\)"):
        SafetensorsFile(raw_file(tmp_path / "h.safetensors", header, a.tobytes() + b"\0" * 8 + b.tobytes()))
    blob = b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'
    (tmp_path / "d.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob + a.tobytes())
    with pytest.raises(WeightsError, match=r"gives the key 'a' twice in its header; it is corrupt"):
        SafetensorsFile(tmp_path / "d.safetensors")


# ----------------------------------------------------------------------------- a whole model folder
def _folder(hf_folder, tmp_path, edit_tensors=None, edit_header=None):
    source = hf_folder("small", **SMALL)[0]
    target = tmp_path / "model"
    shutil.copytree(source, target)
    tensors = load_file(source / "model.safetensors")
    if edit_tensors is not None:
        edit_tensors(tensors)
    tensors_file(target / "model.safetensors", tensors, edit_header)
    return target


def _refused(capsys, args, pattern, dest):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(pattern, err), err
    assert not dest.exists() and not [p for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.")]


def test_negative_offsets_no_longer_read_header_bytes_into_a_bias(hf_folder, tmp_path, capsys):
    """The bug: data_offsets [-128, 0] on a 32-float bias read the JSON header's last 128 bytes, and exit 0."""
    def edit(header):
        header[BIAS]["data_offsets"] = [-128, 0]
    folder = _folder(hf_folder, tmp_path, edit_header=edit)
    before = (folder / "model.safetensors").read_bytes()
    pattern = rf"tensor '{re.escape(BIAS)}' has data_offsets \[-128, 0\]; expected non-negative integers"
    with pytest.raises(WeightsError, match=pattern):
        phi2_jax.from_pretrained(folder)
    dest = tmp_path / "out" / "ckpt"
    dest.parent.mkdir()
    _refused(capsys, ["from-hf", folder, dest], pattern, dest)
    assert (folder / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("dtype", ["int8", "float64"])
def test_a_dtype_a_phi_model_does_not_hold_is_refused_by_name(hf_folder, tmp_path, capsys, dtype):
    name = "model.layers.1.mlp.fc1.weight"
    folder = _folder(hf_folder, tmp_path, lambda t: t.update({name: t[name].astype(dtype)}))
    assert read_header(folder / "model.safetensors")[0][name]["dtype"] == {"int8": "I8", "float64": "F64"}[dtype]
    pattern = (rf"model.safetensors: tensor '{re.escape(name)}' is stored as {dtype}, which a Phi model does not hold "
               r"\(it would be changed on the way in\); expected float32, float16 or bfloat16\.")
    with pytest.raises(WeightsError, match=pattern):
        phi2_jax.from_pretrained(folder)
    dest = tmp_path / "ckpt"
    _refused(capsys, ["from-hf", folder, dest], pattern, dest)
    _refused(capsys, ["inspect", folder], pattern, dest)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_count_nonfinite_agrees_with_numpy(dtype):
    values = np.random.default_rng(0).normal(size=(300, 70)).astype(np.float32)
    values[3, 4], values[299, 69], values[150, 0] = np.nan, np.inf, -np.inf
    values[7, 7] = 1e30  # finite in float32; float16 and bfloat16 make it inf and a huge finite number
    with np.errstate(over="ignore"):  # 1e30 overflows float16 on purpose
        cast = values.astype(dtype)
    expected = int(np.count_nonzero(~np.isfinite(cast.astype(np.float64))))
    assert count_nonfinite(cast, block_bytes=1000) == expected == (4 if dtype == np.float16 else 3)


def test_nonfinite_weights_are_refused_unless_allowed(hf_folder, tmp_path, capsys):
    name = "model.layers.1.self_attn.dense.bias"

    def poison(tensors):
        tensors[name] = tensors[name].copy()
        tensors[name][[0, 5]] = [np.nan, np.inf]
    folder = _folder(hf_folder, tmp_path, poison)
    pattern = (rf"model.safetensors: tensor '{re.escape(name)}' holds 2 NaN or infinite values of 32; "
               r"pass allow_nonfinite=True \(--allow-nonfinite\) to load it anyway\.")
    with pytest.raises(WeightsError, match=pattern):
        phi2_jax.from_pretrained(folder)
    dest = tmp_path / "out" / "ckpt"
    dest.parent.mkdir()
    _refused(capsys, ["from-hf", folder, dest], pattern, dest)  # fails mid-conversion: nothing left behind
    with pytest.warns(UserWarning, match=rf"1 tensor hold NaN or infinite values \(first '{re.escape(name)}': 2\)"):
        model = phi2_jax.from_pretrained(folder, allow_nonfinite=True)
    bias = np.asarray(model.layers.self_attn.dense.bias.get_value()[1])
    assert np.isnan(bias[0]) and bias[5] == np.inf
    main(["from-hf", str(folder), str(dest), "--allow-nonfinite"])
    err = capsys.readouterr().err
    assert f"warning: {folder}: 1 tensor hold NaN or infinite values (first '{name}': 2); loaded as they are" in err


# ----------------------------------------------------------------------------- shard index
def _sharded(hf_folder, tmp_path, edit):
    source = hf_folder("sharded", max_shard_size="20KB", **SMALL)[0]
    target = tmp_path / "sharded"
    shutil.copytree(source, target)
    index = target / "model.safetensors.index.json"
    contents = json.loads(index.read_text())
    edited = edit(contents)
    index.write_bytes(edited if isinstance(edited, bytes) else json.dumps(contents).encode())
    return target


def _first_entry(contents):
    return next(iter(contents["weight_map"]))


INDEX = {
    "parent path": (lambda c: c["weight_map"].update({_first_entry(c): "../model.safetensors"}),
                    r"names shard '../model.safetensors' for '.*', which lies outside .*; expected a file name inside"),
    "absolute path": (lambda c: c["weight_map"].update({_first_entry(c): "/etc/passwd"}),
                      r"names shard '/etc/passwd' for '.*', which lies outside"),
    "nested parent": (lambda c: c["weight_map"].update({_first_entry(c): "sub/../../x.safetensors"}),
                      r"names shard 'sub/../../x.safetensors'"),
    "weight_map a list": (lambda c: c.update(weight_map=[1, 2]),
                          r"has no 'weight_map' object \(found list\); expected a JSON object with 'weight_map'"),
    "index a list": (lambda c: json.dumps([c]).encode(), r"has no 'weight_map' object \(found NoneType\)"),
    "shard a number": (lambda c: c["weight_map"].update({_first_entry(c): 3}),
                       r"maps '.*' to 3; expected the file name of a shard"),
    "not UTF-8": (lambda c: b"\xff\xfe" + json.dumps(c).encode("utf-16-le"),
                  r"model.safetensors.index.json is not UTF-8 text \(byte 0\); expected a safetensors index in JSON"),
}


@pytest.mark.parametrize("how", INDEX)
def test_bad_shard_indexes_are_refused(hf_folder, tmp_path, capsys, how):
    edit, pattern = INDEX[how]
    folder = _sharded(hf_folder, tmp_path, edit)
    with pytest.raises(WeightsError, match=pattern):
        phi2_jax.from_pretrained(folder)
    dest = tmp_path / "ckpt"
    _refused(capsys, ["from-hf", folder, dest], pattern, dest)


# ----------------------------------------------------------------------------- config.json token ids
@pytest.mark.parametrize("key,value", [("eos_token_id", 100), ("bos_token_id", -1)])
def test_token_ids_outside_the_vocabulary_are_refused(hf_folder, tmp_path, key, value):
    folder = _folder(hf_folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ConfigError, match=rf"config.json has {key} {value}, outside the vocabulary of 100 tokens; "
                                          r"expected an id in \[0, 100\)\."):
        phi2_jax.from_pretrained(folder)
