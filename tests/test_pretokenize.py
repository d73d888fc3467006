"""`python -m phi2_jax.pretokenize`: shards that add up to one run, and refusals that leave every file as it was."""

import errno
import json
import logging
import os

import numpy as np
import pytest

from phi2_jax import ConfigError
from phi2_jax.data import pretokenize
from phi2_jax.data.pipeline import build_splits
from phi2_jax.data.token_files import TokenArrays, TokenFile
from tests.hf_reference import train_bpe_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return str(train_bpe_tokenizer(["def g(x): return x * 2"] * 20, 300, tmp_path_factory.mktemp("tok")))


def _corpus(folder, count=90):
    """Text files of different sizes, and a JSONL file, so that shards cut between and across sources."""
    folder.mkdir(parents=True)
    for i in range(count // 2):
        (folder / f"doc{i:03d}.py").write_text(f"def f{i}(x):\n" + f"    x = x * {i} + {i % 7}\n" * (1 + i % 5))
    (folder / "rest.jsonl").write_text("".join(json.dumps({"text": f"y = {i}\n" * (1 + i % 3)}) + "\n"
                                               for i in range(count // 2)))
    return [str(folder / "*.py"), str(folder / "*.jsonl")]


def _run(out, tokenizer_dir, patterns, *extra):
    pretokenize.main([str(out), "--tokenizer", tokenizer_dir, "--val-fraction", "0.2",
                      *(arg for p in patterns for arg in ("--source", p)), *extra])


def _tree(folder):
    """Every file under `folder`, path -> bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("num_shards", [2, 3, 200])
def test_shards_together_give_one_runs_token_streams(tmp_path, tokenizer_dir, num_shards, capsys):
    patterns = _corpus(tmp_path / "corpus")
    _run(tmp_path / "one", tokenizer_dir, patterns)
    for shard in reversed(range(num_shards)):  # any order: each shard is its own process
        _run(tmp_path / "sharded", tokenizer_dir, patterns, "--shard", str(shard), "--num-shards", str(num_shards))
    assert f"wrote {tmp_path / 'sharded' / 'shard-00000'} in" in capsys.readouterr().out
    one = sorted((tmp_path / "one").glob("train-*.uint16"))
    assert [p.name for p in one] == ["train-000.uint16", "train-001.uint16"]
    shards = sorted((tmp_path / "sharded").glob("shard-*/train-*.uint16"))
    np.testing.assert_array_equal(TokenArrays(shards)[:], TokenArrays(one)[:])
    validation = sorted((tmp_path / "sharded").glob("shard-*/validation.*"))
    assert len(validation) == num_shards
    held_out = TokenArrays([tmp_path / "one" / "validation.uint16"])[:]
    assert len(held_out) > 0
    np.testing.assert_array_equal(TokenArrays(validation)[:], held_out)
    # Disjoint: every file is read by exactly one shard.
    summaries = [json.loads(p.read_text()) for p in sorted((tmp_path / "sharded").glob("shard-*/tokens.json"))]
    assert [s["shard"] for s in summaries] == list(range(num_shards))
    assert sum(e.get("source_files", 0) for s in summaries for e in s["files"].values()) == 46
    assert {s["dtype"] for s in summaries} == {"uint16"}
    if num_shards == 2:  # about equal bytes
        sizes = [sum(p.stat().st_size for p in shards if p.parent.name == f"shard-{k:05d}") for k in (0, 1)]
        assert 0.5 < sizes[0] / sizes[1] < 2

    # Training globs the shards together and reads what one run gives.
    from_shards = build_splits([{"path": str(tmp_path / "sharded" / "shard-*" / "train-*"), "format": "tokens"},
                                {"path": str(tmp_path / "sharded" / "shard-*" / "validation.*"), "format": "tokens",
                                 "split": "validation"}], tokenizer_dir, 8, 0.2, 300)
    np.testing.assert_array_equal(from_shards.train[0].tokens[:], TokenArrays(one)[:])
    np.testing.assert_array_equal(from_shards.validation.tokens[:], held_out)


def test_a_shard_of_another_sharding_or_out_of_range_is_refused(tmp_path, tokenizer_dir, capsys):
    patterns = _corpus(tmp_path / "corpus")
    _run(tmp_path / "out", tokenizer_dir, patterns, "--shard", "0", "--num-shards", "2")
    before = _tree(tmp_path)
    for args, message in [
        (("--shard", "1", "--num-shards", "3"),
         f"{tmp_path / 'out' / 'shard-00000'} was written with --num-shards 2, not 3; expected one OUT_DIR per "
         f"sharding (a glob over both would read parts of the corpus twice)."),
        (("--shard", "2", "--num-shards", "2"),
         "--shard 2 of --num-shards 2 is out of range; expected 0 <= shard < num-shards (a SLURM array's "
         "SLURM_ARRAY_TASK_ID, a Job's completion index)."),
    ]:
        with pytest.raises(SystemExit) as refused:
            _run(tmp_path / "out", tokenizer_dir, patterns, *args)
        assert refused.value.code == 2 and capsys.readouterr().err.strip().endswith(message)
    assert _tree(tmp_path) == before


def test_an_out_dir_among_the_sources_is_refused_before_anything_is_read_or_deleted(tmp_path, tokenizer_dir, capsys,
                                                                                     monkeypatch):
    data = tmp_path / "data"
    _corpus(data / "code")
    (data / "tok").mkdir()
    (data / "tok" / "old.txt").write_text("an earlier output, kept unless the run goes ahead")
    before = _tree(tmp_path)
    monkeypatch.setattr("phi2_jax.data.pipeline.read_source", lambda *a: pytest.fail("read a source"))
    cases = [
        # The output is the sources' folder, or holds it: --overwrite would delete the corpus.
        (data / "code", str(data / "code" / "*.py"), f"OUT_DIR {data / 'code'} holds {data / 'code' / 'doc000.py'}, "
         f"a file of source '{data / 'code' / '*.py'}'; expected an OUT_DIR apart from the sources (writing there "
         f"would read its own output, and --overwrite would delete the corpus)."),
        (data, str(data / "code" / "*.jsonl"), f"OUT_DIR {data} holds {data / 'code' / 'rest.jsonl'}"),
        # The output lies where a source's glob reaches: it would be read back as text.
        (data / "new", str(data / "**"), f"source '{data / '**'}' could match the token files written into OUT_DIR "
         f"{data / 'new'}; expected an OUT_DIR outside what the sources' globs match."),
        (data / "new", str(data / "**" / "*[0-9]*"), "could match the token files written into OUT_DIR"),
        (data / "new", str(data / "*" / "*"), "could match the token files written into OUT_DIR"),
    ]
    for out, pattern, message in cases:
        with pytest.raises(SystemExit) as refused:
            pretokenize.main([str(out), "--tokenizer", tokenizer_dir, "--source", pattern, "--overwrite"])
        err = capsys.readouterr().err
        assert refused.value.code == 2 and message in err, err
        assert _tree(tmp_path) == before  # byte for byte: nothing deleted, nothing written
    # Globs that cannot reach the output's files are fine beside it.
    monkeypatch.undo()
    for pattern in (str(data / "*" / "*.py"), str(data / "**" / "*.jsonl")):
        pretokenize.main([str(data / "tok"), "--tokenizer", tokenizer_dir, "--source", pattern, "--overwrite"])
    assert sorted(p.name for p in (data / "tok").iterdir()) == ["tokens.json", "train-000.uint16", "validation.uint16"]


def test_a_binary_text_source_is_refused_naming_the_file(tmp_path, tokenizer_dir, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("plain text\n")
    np.arange(100, dtype=np.int32).tofile(corpus / "b.txt")  # token ids under a text name
    with pytest.raises(SystemExit) as refused:
        pretokenize.main([str(tmp_path / "out"), "--tokenizer", tokenizer_dir, "--source", str(corpus / "*.txt")])
    assert refused.value.code == 2
    assert capsys.readouterr().err.strip().endswith(
        f"{corpus / 'b.txt'} holds NUL bytes, so it is binary, not text; expected text, .jsonl or .parquet files "
        f"(token files are read with format: tokens).")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["corpus"]


def test_a_full_disk_names_out_dir_and_leaves_nothing(tmp_path, tokenizer_dir, capsys, monkeypatch):
    """The token files are written into a hidden staging folder beside OUT_DIR: the sentence named that folder,
    which is deleted as the command stops, instead of OUT_DIR."""
    patterns = _corpus(tmp_path / "corpus")
    flush = TokenFile._flush

    def fills_the_disk(self):
        flush(self)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(TokenFile, "_flush", fills_the_disk)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as refused:
        _run(out, tokenizer_dir, patterns)
    assert refused.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: could not write {out} (No space left on device); free some space or choose another destination. "
        f"Nothing was changed there.")
    assert [p.name for p in tmp_path.iterdir()] == ["corpus"]


def test_an_empty_validation_file_is_warned_about(tmp_path, tokenizer_dir, caplog):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "only.txt").write_text("x = 1\n")
    with caplog.at_level(logging.WARNING, logger="phi2_jax.data.pretokenize"):
        pretokenize.main([str(tmp_path / "out"), "--tokenizer", tokenizer_dir, "--source", str(corpus / "*.txt"),
                          "--val-fraction", "0.01"])
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'out' / 'validation.uint16'} holds no tokens: none of the documents fell in the held-out "
        f"--val-fraction 0.01; training from these files reports no validation loss unless another validation file "
        f"is given."]
    assert (tmp_path / "out" / "validation.uint16").stat().st_size == 0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="phi2_jax.data.pretokenize"):  # none asked for: nothing to say
        pretokenize.main([str(tmp_path / "out0"), "--tokenizer", tokenizer_dir, "--source", str(corpus / "*.txt"),
                          "--val-fraction", "0"])
    assert caplog.records == []


def test_training_on_an_unfinished_sharding_is_refused(tmp_path, tokenizer_dir):
    patterns = _corpus(tmp_path / "corpus")
    for shard in (0, 2):  # shard 1 of 3 has not run yet
        _run(tmp_path / "out", tokenizer_dir, patterns, "--shard", str(shard), "--num-shards", "3")
    sources = [{"path": str(tmp_path / "out" / "shard-*" / "train-*"), "format": "tokens"}]
    with pytest.raises(ConfigError) as refused:
        build_splits(sources, tokenizer_dir, 8, 0.2, 300)
    assert str(refused.value) == (
        f"{tmp_path / 'out'} holds 2 of the 3 shards of a sharded pretokenize (shard-00001 is missing); expected every "
        f"shard finished before training (e.g. sbatch --dependency=afterok:<the array's job id>).")
    _run(tmp_path / "out", tokenizer_dir, patterns, "--shard", "1", "--num-shards", "3")
    assert len(build_splits(sources, tokenizer_dir, 8, 0.2, 300).train[0].tokens) > 0
