"""A run trained by `python -m phi2_jax.train` (sentencepiece tokenizer) exported with its tokenizer, and
loaded past a damaged newest checkpoint, as the trainer resumes past one."""

import json
import logging
import re
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

import phi2_jax
from phi2_jax.checkpoint import run_checkpoints
from phi2_jax.data.tokenizer import load_tokenizer, train_sentencepiece
from phi2_jax.hf.convert import main
from tests import train_runs
from tests.hf_reference import reference_logits

SMALL = dict(dialect="5.x", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, partial_rotary_factor=0.5)
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Code the run's tokenizer never saw (it trains on the first documents of the stdlib), plus awkward text.
UNSEEN = [(STDLIB / name).read_text() for name in ("textwrap.py", "difflib.py", "shlex.py")] + [
    "  two leading spaces\tand a tab\n\n    indented = 1234567\n", "ünïcödé, 日本語 and 🙂 fall back to bytes",
    " leading", "trailing ", "a  b   c", "\n\nx", ""]


def convert(*args):
    main([str(a) for a in args])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """runs/tiny as a user makes it: 10 steps of the default run (sentencepiece), checkpoints at 5 and 10."""
    root = tmp_path_factory.mktemp("trained")
    train_runs.run(root / "run", "train.steps=10", cache=root / "cache")
    return root / "run"


def _recorded_tokenizer(run_dir: Path) -> Path:
    return Path(run_checkpoints.read_meta(run_checkpoints.resolve_step_dir(run_dir))["tokenizer"])


def _same_ids(sp_model: Path, exported: Path):
    """The exported tokenizer.json encodes and decodes exactly as sentencepiece does (three readers of it)."""
    import sentencepiece as spm
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    raw = Tokenizer.from_file(str(exported / "tokenizer.json"))
    ours = load_tokenizer(exported)
    auto = AutoTokenizer.from_pretrained(exported)
    assert ours.eos_id == sp.eos_id() and auto.eos_token_id == sp.eos_id()
    for text in UNSEEN:
        ids = sp.encode(text)
        assert raw.encode(text, add_special_tokens=False).ids == ids, text[:40]
        assert ours.encode(text) == ids and auto(text, add_special_tokens=False)["input_ids"] == ids, text[:40]
        assert ours.decode(ids) == sp.decode(ids) == auto.decode(ids)


def test_to_hf_of_a_default_run_exports_its_sentencepiece_tokenizer(trained_run, tmp_path, capsys):
    sp_model = _recorded_tokenizer(trained_run)
    assert sp_model.suffix == ".model"
    capsys.readouterr()
    convert("to-hf", trained_run, tmp_path / "hf", "--dtype", "float32")
    err = capsys.readouterr().err
    assert (f"tokenizer: converted the sentencepiece model {sp_model} to tokenizer.json and "
            f"tokenizer_config.json.") in err
    assert {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == sp_model.read_bytes()
    _same_ids(sp_model, tmp_path / "hf")
    # the exported folder is a transformers model that computes what the run computes
    from transformers import PhiForCausalLM
    ids = np.random.default_rng(0).integers(0, 512, (1, 9))
    loaded = PhiForCausalLM.from_pretrained(tmp_path / "hf").eval()
    np.testing.assert_allclose(reference_logits(loaded, ids), np.asarray(phi2_jax.from_pretrained(trained_run)(ids)),
                               rtol=2e-5, atol=2e-5)


def test_tokenizer_options_and_the_line_when_none_is_exported(hf_folder, tmp_path, capsys, monkeypatch):
    import sentencepiece as spm

    folder, _ = hf_folder("small", **SMALL)
    convert("from-hf", folder, tmp_path / "ckpt")
    capsys.readouterr()
    convert("to-hf", tmp_path / "ckpt", tmp_path / "none")
    assert (f"tokenizer not exported: {tmp_path / 'ckpt'} records no tokenizer; pass --tokenizer with a folder "
            f"holding tokenizer.json or a sentencepiece .model file.") in capsys.readouterr().err
    assert not (tmp_path / "none" / "tokenizer.json").exists()

    monkeypatch.setenv("PHI2_JAX_CACHE", str(tmp_path / "cache"))  # the trainer's own settings, on other code
    texts = [(Path(json.__file__).parent / name).read_text() for name in ("decoder.py", "encoder.py", "scanner.py")]
    bpe = train_sentencepiece(lambda: texts, 600, "test")
    convert("to-hf", tmp_path / "ckpt", tmp_path / "given", "--tokenizer", bpe)
    assert f"tokenizer: converted the sentencepiece model {bpe} to tokenizer.json" in capsys.readouterr().err
    _same_ids(bpe, tmp_path / "given")

    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "uni"), vocab_size=500,
                                   model_type="unigram", eos_id=1, bos_id=-1, minloglevel=2)
    convert("to-hf", tmp_path / "ckpt", tmp_path / "unigram", "--tokenizer", tmp_path / "uni.model")
    assert ("tokenizer not exported: uni.model is a sentencepiece unigram model; only BPE models are converted, and "
            "transformers needs a tokenizer.json; pass --tokenizer with a folder that holds one.") in capsys.readouterr().err
    assert not (tmp_path / "unigram" / "tokenizer.json").exists() and (tmp_path / "unigram" / "model.safetensors").exists()

    with pytest.raises(SystemExit):
        convert("to-hf", tmp_path / "ckpt", tmp_path / "bad", "--tokenizer", tmp_path / "uni.vocab")
    assert ("--tokenizer " + str(tmp_path / "uni.vocab") + " is neither a folder holding tokenizer files (e.g. "
            "tokenizer.json), a tokenizer.json file, nor a sentencepiece .model file.") in capsys.readouterr().err


def test_from_hf_records_the_folders_tokenizer_and_to_hf_carries_it(hf_folder, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(hf_folder("small", **SMALL)[0], folder)
    (folder / "tokenizer.json").write_text('{"made": "by hand"}')
    (folder / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    convert("from-hf", folder, tmp_path / "ckpt")
    capsys.readouterr()
    convert("to-hf", tmp_path / "ckpt", tmp_path / "hf")
    assert (f"tokenizer: copied tokenizer.json, tokenizer_config.json from {folder.absolute()}."
            in capsys.readouterr().err)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (folder / name).read_bytes()


# ----------------------------------------------------------------------------- damaged newest checkpoint
def _damage(step_dir: Path) -> None:
    for file in (step_dir / "params").rglob("*"):
        if file.is_file():
            file.write_bytes(b"garbage")


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(trained_run, tmp_path, caplog, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    _damage(run / "checkpoints" / "10")
    damaged = run / "checkpoints" / "10"
    line = re.compile(rf"{re.escape(str(damaged))} could not be restored \(\w+: .*\); using the previous checkpoint, "
                      rf"{re.escape(str(run / 'checkpoints' / '5'))}\.")
    with caplog.at_level(logging.WARNING):
        model = phi2_jax.from_pretrained(run)
    assert [r for r in caplog.records if line.fullmatch(r.getMessage())], caplog.text
    step5 = train_runs.final_params(trained_run, 5)
    np.testing.assert_array_equal(np.asarray(model.layers.mlp.fc1.kernel.get_value()), step5["layers/mlp/fc1/kernel"])
    np.testing.assert_array_equal(np.asarray(model.embed_tokens.get_value()), step5["embed_tokens"])

    # generate: the same model and the same line (the run records its tokenizer in every checkpoint)
    from phi2_jax.inference.cli import main as generate
    caplog.clear()
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        generate(["--model", str(run), "--prompt", "def ", "--max-new-tokens", "4"])
    fallback_text = capsys.readouterr().out
    assert [r for r in caplog.records if line.fullmatch(r.getMessage())], caplog.text
    generate(["--model", str(trained_run / "checkpoints" / "5"), "--prompt", "def ", "--max-new-tokens", "4",
              "--tokenizer", str(_recorded_tokenizer(trained_run))])
    assert capsys.readouterr().out == fallback_text

    # to-hf exports step 5, saying so
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        convert("to-hf", run, tmp_path / "hf", "--dtype", "float32")
    assert [r for r in caplog.records if line.fullmatch(r.getMessage())], caplog.text
    from safetensors.numpy import load_file
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    np.testing.assert_array_equal(exported["model.layers.1.mlp.fc1.weight"], step5["layers/mlp/fc1/kernel"][1].T)

    # a step folder named explicitly, or a run with nothing older, is refused in one sentence
    with pytest.raises(phi2_jax.WeightsError, match=rf"{re.escape(str(damaged))} could not be restored \(\w+: .*\); "
                                                    r"the checkpoint is damaged\.$"):
        phi2_jax.from_pretrained(damaged)
    _damage(run / "checkpoints" / "5")
    with pytest.raises(phi2_jax.WeightsError, match=r"checkpoints/5 could not be restored \(\w+: .*\); the checkpoint "
                                                    r"is damaged, and so are the 1 newer one\.$"):
        phi2_jax.from_pretrained(run)
