"""The input pipeline: packing, sources, mixture, sharding and iterator state."""

import json
import logging
import os
import pickle
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from phi2_jax import ConfigError
from phi2_jax.data import tokenize_once
from phi2_jax.data.pipeline import (allow_grain_workers, PackedSequences, Splits, build_splits, train_dataset,
                                    validation_batches)
from phi2_jax.data.sources import is_validation, read_source
from phi2_jax.data.token_files import TokenArrays
from phi2_jax.data.tokenizer import load_tokenizer
from tests.hf_reference import train_bpe_tokenizer


def test_packing_marks_documents_and_restarts_positions():
    eos = 9
    tokens = np.array([1, 2, 9, 3, 4, 5, 9, 6, 7], np.int32)  # docs: [1 2 EOS] [3 4 5 EOS] [6 7 ...
    example = PackedSequences(tokens, seq_len=8, eos_id=eos)[0]
    np.testing.assert_array_equal(example["input_ids"], [1, 2, 9, 3, 4, 5, 9, 6])
    np.testing.assert_array_equal(example["targets"], [2, 9, 3, 4, 5, 9, 6, 7])
    np.testing.assert_array_equal(example["segment_ids"], [1, 1, 1, 2, 2, 2, 2, 3])
    np.testing.assert_array_equal(example["positions"], [0, 1, 2, 0, 1, 2, 3, 0])


def _splits(*streams, weights=None):
    packed = [PackedSequences(s, 4, eos_id=-1) for s in streams]
    return Splits(packed, weights or [1.0] * len(packed), packed[0], None)


def test_mixture_follows_the_weights():
    a = np.zeros(40_001, np.int32)       # every token of source a is 0
    b = np.ones(40_001, np.int32)        # every token of source b is 1
    it = iter(train_dataset(_splits(a, b, weights=[0.8, 0.2]), batch_size=50, seed=0))
    rows = np.concatenate([next(it)["input_ids"][:, 0] for _ in range(40)])
    assert abs((rows == 0).mean() - 0.8) < 0.03


def test_iterator_state_resumes_exactly():
    stream = np.arange(100_001, dtype=np.int32)
    it = iter(train_dataset(_splits(stream), batch_size=3, seed=1))
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what goes into a checkpoint
    expected = [next(it)["input_ids"] for _ in range(3)]
    again = iter(train_dataset(_splits(stream), batch_size=3, seed=1))
    again.set_state(state)
    for batch in expected:
        np.testing.assert_array_equal(next(again)["input_ids"], batch)


def test_processes_split_the_same_global_batch():
    stream = np.arange(10_001, dtype=np.int32)
    whole = iter(train_dataset(_splits(stream), batch_size=4, seed=2))
    halves = [iter(train_dataset(_splits(stream), batch_size=2, seed=2, process_index=p, process_count=2)) for p in (0, 1)]
    for _ in range(3):
        np.testing.assert_array_equal(next(whole)["input_ids"],
                                      np.concatenate([next(h)["input_ids"] for h in halves]))


def test_jsonl_and_parquet_sources(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"text": "world"}) + "\n")
    assert [d.text for d in read_source({"path": str(tmp_path / "*.jsonl")})] == ["hello", "world"]
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": ["x = 1", "y = 2"]}), tmp_path / "b.parquet")
    assert [d.text for d in read_source({"path": str(tmp_path / "*.parquet"), "field": "content"})] == ["x = 1", "y = 2"]


def test_bad_sources_say_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl line 2 is not valid JSON"):
        list(read_source({"path": str(tmp_path / "bad.jsonl")}))
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ConfigError, match=r"nofield.jsonl line 1 has no string field 'text'"):
        list(read_source({"path": str(tmp_path / "nofield.jsonl")}))
    with pytest.raises(ConfigError, match=r"matches no files"):
        read_source({"path": str(tmp_path / "*.txt")})
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ConfigError, match=r"latin1.jsonl line 2 is not UTF-8 text"):
        list(read_source({"path": str(tmp_path / "latin1.jsonl")}))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ConfigError, match=r"'.*folder' is a folder; expected a file or a glob such as '.*folder/\*\*/\*.jsonl'"):
        read_source({"path": str(tmp_path / "folder")})
    with pytest.raises(ConfigError, match=r"matches no files"):  # a glob matching only folders
        read_source({"path": str(tmp_path / "fold*")})


@pytest.mark.parametrize("table, field, message", [
    ({"content": ["x = 1"]}, "text", r"has no column 'text'; its columns are content"),
    ({"text": [1, 2]}, "text", r"column 'text' holds int64; expected strings"),
    (None, "text", r"could not be read as Parquet"),
], ids=["missing-column", "not-strings", "not-parquet"])
def test_bad_parquet_sources_are_refused_in_a_sentence(tmp_path, table, field, message):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    if table is None:
        path.write_text("this is not parquet")
    else:
        pq.write_table(pa.table(table), path)
    with pytest.raises(ConfigError, match=message):
        list(read_source({"path": str(path), "field": field}))


def test_hf_tokenizer_json_round_trips(tmp_path):
    from tokenizers import Tokenizer

    folder = train_bpe_tokenizer(["def f(x):\n    return x + 1\n"] * 50, 300, tmp_path)
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    loaded = load_tokenizer(folder)
    text = "def g(y):\n    return y * 2\n"
    assert loaded.decode(loaded.encode(text)) == text
    assert loaded.eos_id == reference.token_to_id("<|endoftext|>")
    assert loaded.encode(text) == reference.encode(text).ids  # no BOS prepended


def test_worker_processes_give_the_same_batches_and_resume():
    stream = np.arange(50_001, dtype=np.int32)
    plain = iter(train_dataset(_splits(stream), batch_size=3, seed=4))
    allow_grain_workers()
    workers = iter(train_dataset(_splits(stream), batch_size=3, seed=4, workers=2))
    for _ in range(3):
        np.testing.assert_array_equal(next(workers)["input_ids"], next(plain)["input_ids"])
    state = json.loads(json.dumps(workers.get_state()))
    resumed = iter(train_dataset(_splits(stream), batch_size=3, seed=4, workers=2))
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["input_ids"], next(plain)["input_ids"])


def test_tokenizer_training_is_the_same_in_every_process(tmp_path):
    """The same corpus gives the same tokenizer in fresh processes, also when its lines are sampled."""
    script = (
        "import json, numpy as np, sentencepiece as spm\n"
        "from phi2_jax.data import tokenizer\n"
        "rng = np.random.default_rng(1)\n"
        "words = [''.join(rng.choice(list('abcdefghij'), rng.integers(2, 7))) for _ in range(300)]\n"
        "lines = [' '.join(row) for row in rng.choice(words, (tokenizer._TOKENIZER_TRAINING_LINES + 10_000, 6))]\n"
        "texts = ['\\n'.join(lines[i:i + 100]) for i in range(0, len(lines), 100)]  # more lines than it trains on\n"
        "sp = spm.SentencePieceProcessor(model_file=str(tokenizer.train_sentencepiece(lambda: texts, 300, 't')))\n"
        "print(json.dumps([sp.id_to_piece(i) for i in range(sp.get_piece_size())]))\n"
    )
    vocabularies = []
    for run in range(2):
        env = {**os.environ, "PHI2_JAX_CACHE": str(tmp_path / f"cache{run}")}
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        vocabularies.append(json.loads(proc.stdout))
    assert len(vocabularies[0]) == 300
    assert vocabularies[0] == vocabularies[1]


def _corpus(folder, count=60):
    """A small code corpus in two formats: one text file per document and a JSONL file."""
    folder.mkdir()
    texts = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(count)]
    for i, text in enumerate(texts[:count // 2]):
        (folder / f"doc{i:03d}.py").write_text(text)
    (folder / "rest.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[count // 2:]))
    return texts


def test_token_files_hold_every_document_and_eos_in_order_and_are_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("PHI2_JAX_CACHE", str(tmp_path / "cache"))
    _corpus(tmp_path / "corpus")
    tokenizer = load_tokenizer(train_bpe_tokenizer([f"def g(x): return x * {i}" for i in range(50)], 300, tmp_path / "tok"))
    sources = [{"path": str(tmp_path / "corpus" / "*.py")}, {"path": str(tmp_path / "corpus" / "*.jsonl"), "weight": 2}]
    splits = build_splits(sources, str(tmp_path / "tok"), 8, 0.2, 300)

    # The reference: each source's documents, split by name, encoded one by one, each followed by EOS.
    def expected(docs):
        return [t for d in docs for t in tokenizer.encode(d.text) + [tokenizer.eos_id]]
    docs = [list(read_source(s)) for s in sources]
    for packed, source_docs in zip(splits.train, docs):
        assert list(packed.tokens[:]) == expected([d for d in source_docs if not is_validation(d, 0.2)])
    assert list(splits.validation.tokens[:]) == expected([d for s in docs for d in s if is_validation(d, 0.2)])
    assert splits.weights == [1.0, 2.0]
    assert sorted(p.suffix for p in (tmp_path / "cache" / "tokens").iterdir()) == [".uint16"] * 3

    # Cached: a second build reads no document at all.
    monkeypatch.setattr("phi2_jax.data.pipeline.read_source", lambda source: pytest.fail("re-read a cached source"))
    again = build_splits(sources, str(tmp_path / "tok"), 8, 0.2, 300)
    assert [list(p.tokens[:]) for p in again.train] == [list(p.tokens[:]) for p in splits.train]


def test_an_edited_source_is_tokenized_again(tmp_path, monkeypatch):
    monkeypatch.setenv("PHI2_JAX_CACHE", str(tmp_path / "cache"))
    _corpus(tmp_path / "corpus")
    tokenizer_dir = train_bpe_tokenizer(["def g(x): return x"] * 20, 300, tmp_path / "tok")
    sources = [{"path": str(tmp_path / "corpus" / "*.jsonl")}]
    before = build_splits(sources, str(tokenizer_dir), 8, 0.0, 300).train[0].tokens[:]
    with open(tmp_path / "corpus" / "rest.jsonl", "a") as f:
        f.write(json.dumps({"text": "x = 1\n" * 40}) + "\n")
    after = build_splits(sources, str(tokenizer_dir), 8, 0.0, 300).train[0].tokens[:]
    assert len(after) > len(before) and list(after[:len(before)]) == list(before)


def test_a_bad_record_midway_leaves_no_token_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PHI2_JAX_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [json.dumps({"text": f"print({i})"}) for i in range(600)]  # past the first batch of 256 documents
    (corpus / "data.jsonl").write_text("\n".join(lines[:500] + ["{broken"] + lines[500:]) + "\n")
    tokenizer_dir = train_bpe_tokenizer(["print(1)"] * 20, 300, tmp_path / "tok")
    with pytest.raises(ConfigError, match=r"data.jsonl line 501 is not valid JSON"):
        build_splits([{"path": str(corpus / "data.jsonl")}], str(tokenizer_dir), 8, 0.1, 300)
    assert list((tmp_path / "cache" / "tokens").iterdir()) == []  # no partial stream to be reused later


def test_sources_are_read_lazily_file_by_file(tmp_path):
    _corpus(tmp_path / "corpus")
    docs = read_source({"path": str(tmp_path / "corpus" / "*.py")})  # checks the pattern, reads nothing yet
    for path in sorted((tmp_path / "corpus").glob("*.py"))[1:]:
        path.unlink()
    assert next(docs).text.startswith("def f0(x):")  # only the first file has been opened
    with pytest.raises(FileNotFoundError):
        next(docs)


def test_token_files_read_as_one_stream_and_reach_grain_workers_as_paths(tmp_path):
    stream = np.arange(100_001, dtype=np.int32)
    stream[:40_000].tofile(tmp_path / "a.int32")                 # the pipeline's own raw cache format
    np.save(tmp_path / "b.npy", stream[40_000:70_000].astype(np.uint32))   # .npy of another integer dtype
    np.save(tmp_path / "c.npy", stream[70_000:])
    tokens = TokenArrays([tmp_path / "a.int32", tmp_path / "b.npy", tmp_path / "c.npy"])
    assert len(tokens) == len(stream) and tokens[-1] == stream[-1] and tokens[40_000] == 40_000
    for start, stop in [(0, 10), (39_990, 40_010), (39_999, 70_001), (69_995, 100_001), (5, 5)]:
        np.testing.assert_array_equal(tokens[start:stop], stream[start:stop])  # across file boundaries too
    packed = PackedSequences(tokens, 16, eos_id=-1)
    pickled = pickle.dumps(packed)
    assert len(pickled) < 2_000  # the paths, not the 400 kB of tokens
    for i in (0, 2_499, len(packed) - 1):
        np.testing.assert_array_equal(pickle.loads(pickled)[i]["input_ids"], stream[i * 16:i * 16 + 16])


def test_pretokenized_sources_train_and_validate_as_given(tmp_path, monkeypatch):
    monkeypatch.setenv("PHI2_JAX_CACHE", str(tmp_path / "cache"))
    tokenizer_dir = train_bpe_tokenizer(["def g(x): return x"] * 20, 300, tmp_path / "tok")
    rng = np.random.default_rng(0)
    np.save(tmp_path / "train-0.npy", rng.integers(0, 300, 5_000).astype(np.uint16))
    np.save(tmp_path / "train-1.npy", rng.integers(0, 300, 3_000).astype(np.uint16))
    np.save(tmp_path / "valid.npy", rng.integers(0, 300, 900).astype(np.uint16))
    _corpus(tmp_path / "corpus")
    sources = [{"path": str(tmp_path / "train-*.npy"), "format": "tokens", "weight": 3},
               {"path": str(tmp_path / "valid.npy"), "format": "tokens", "split": "validation"},
               {"path": str(tmp_path / "corpus" / "*.jsonl")}]
    splits = build_splits(sources, str(tokenizer_dir), 8, 0.5, 300)
    given = np.concatenate([np.load(tmp_path / f"train-{i}.npy") for i in (0, 1)])
    np.testing.assert_array_equal(splits.train[0].tokens[:], given)
    assert splits.weights == [3.0, 1.0]
    # Validation: the text source's held-out documents, then the validation token file.
    text_validation = [d for d in read_source(sources[2]) if is_validation(d, 0.5)]
    held_out = [t for d in text_validation for t in splits.tokenizer.encode(d.text) + [splits.tokenizer.eos_id]]
    np.testing.assert_array_equal(splits.validation.tokens[:], np.concatenate([held_out, np.load(tmp_path / "valid.npy")]))


@pytest.mark.parametrize("array, sources, message", [
    (np.array([1, 2, 300]), None, r"holds token id 300, outside the model's vocabulary of 300"),
    (np.ones((4, 4), np.int32), None, r"holds a 2-d int32 array; expected a 1-d array of token ids"),
    (np.ones(8, np.float32), None, r"holds a 1-d float32 array"),
    (np.ones(64, np.int32), [{"format": "tokens", "split": "validation"}], r"validation token files only"),
    (np.ones(64, np.int32), [{"split": "validation"}], r"'split' takes train or validation, for token files"),
], ids=["out-of-vocabulary", "2-d", "float", "validation-only", "split-on-text"])
def test_bad_token_sources_are_refused_in_a_sentence(tmp_path, monkeypatch, array, sources, message):
    monkeypatch.setenv("PHI2_JAX_CACHE", str(tmp_path / "cache"))
    np.save(tmp_path / "tokens.npy", array)
    tokenizer_dir = train_bpe_tokenizer(["def g(x): return x"] * 20, 300, tmp_path / "tok")
    sources = [{"path": str(tmp_path / "tokens.npy"), **extra} for extra in sources or [{"format": "tokens"}]]
    with pytest.raises(ConfigError, match=message):
        build_splits(sources, str(tokenizer_dir), 8, 0.1, 300)


def test_auto_tokenizer_needs_text_sources(tmp_path):
    np.save(tmp_path / "tokens.npy", np.ones(64, np.int32))
    with pytest.raises(ConfigError, match=r"'auto' trains on text sources and there are none"):
        build_splits([{"path": str(tmp_path / "tokens.npy"), "format": "tokens"}], "auto", 8, 0.1, 300)


def test_pretokenized_folder_trains_like_the_trainers_own_cache(tmp_path, monkeypatch, capsys):
    from phi2_jax.data import pretokenize

    monkeypatch.setenv("PHI2_JAX_CACHE", str(tmp_path / "cache"))
    _corpus(tmp_path / "corpus")
    tokenizer_dir = str(train_bpe_tokenizer(["def g(x): return x"] * 20, 300, tmp_path / "tok"))
    patterns = [str(tmp_path / "corpus" / "*.py"), str(tmp_path / "corpus" / "*.jsonl")]
    out = tmp_path / "tokens"
    pretokenize.main([str(out), "--tokenizer", tokenizer_dir, "--val-fraction", "0.2",
                      *(arg for p in patterns for arg in ("--source", p))])
    assert "wrote" in capsys.readouterr().out
    summary = json.loads((out / "tokens.json").read_text())
    assert summary["eos_id"] == load_tokenizer(tokenizer_dir).eos_id and len(summary["files"]) == 3

    from_text = build_splits([{"path": p} for p in patterns], tokenizer_dir, 8, 0.2, 300)
    from_files = build_splits([{"path": str(out / "train-*.uint16"), "format": "tokens"},
                               {"path": str(out / "validation.uint16"), "format": "tokens", "split": "validation"}],
                              tokenizer_dir, 8, 0.2, 300)
    np.testing.assert_array_equal(from_files.train[0].tokens[:],
                                  np.concatenate([packed.tokens[:] for packed in from_text.train]))
    np.testing.assert_array_equal(from_files.validation.tokens[:], from_text.validation.tokens[:])
    assert summary["files"]["train-000.uint16"]["tokens"] == len(from_text.train[0].tokens)

    # An existing folder is kept unless --overwrite; a bad source leaves no folder behind.
    before = (out / "tokens.json").read_text()
    with pytest.raises(SystemExit) as refused:
        pretokenize.main([str(out), "--tokenizer", tokenizer_dir, "--source", patterns[0]])
    assert refused.value.code == 2 and "is not empty" in capsys.readouterr().err
    assert (out / "tokens.json").read_text() == before
    with pytest.raises(SystemExit):
        pretokenize.main([str(tmp_path / "new"), "--tokenizer", tokenizer_dir, "--source", str(tmp_path / "*.nothing")])
    assert "matches no files" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_token_files_need_a_known_dtype(tmp_path):
    np.ones(8, np.uint16).tofile(tmp_path / "train.bin")
    with pytest.raises(ConfigError, match=r"train.bin is neither a .npy array nor a raw .uint16 or .int32 token file"):
        TokenArrays([tmp_path / "train.bin"])


@pytest.mark.parametrize("weight", [0, -1.5, "0.5", True, float("nan"), None])
def test_a_weight_that_is_not_a_positive_number_is_refused(tmp_path, weight):
    _corpus(tmp_path / "corpus")
    path = str(tmp_path / "corpus" / "*.py")
    with pytest.raises(ConfigError) as refused:
        build_splits([{"path": path, "weight": weight}], "unused", 8, 0.1, 300)
    assert str(refused.value) == (f"data source '{path}' has weight {weight!r}; expected a positive number "
                                  f"(a sampling ratio such as 0.5).")


def test_negative_max_documents_is_refused():
    with pytest.raises(ConfigError) as refused:
        build_splits([{"path": "stdlib"}], "auto", 8, 0.1, 300, max_documents=-1)
    assert str(refused.value) == "data.max_documents is -1; expected 0 (every document) or a positive cap."


def test_a_binary_text_source_is_refused_naming_the_file(tmp_path):
    (tmp_path / "tokens.txt").write_bytes(np.arange(50, dtype=np.int32).tobytes())
    with pytest.raises(ConfigError) as refused:
        list(read_source({"path": str(tmp_path / "*.txt")}))
    assert str(refused.value) == (f"{tmp_path / 'tokens.txt'} holds NUL bytes, so it is binary, not text; expected "
                                  f"text, .jsonl or .parquet files (token files are read with format: tokens).")


def test_a_too_small_validation_split_is_warned_about(caplog):
    stream = np.arange(100, dtype=np.int32)
    splits = Splits([PackedSequences(stream, 4, -1)], [1.0], PackedSequences(stream[:30], 4, -1), None)
    with caplog.at_level(logging.WARNING, logger="phi2_jax.data.pipeline"):
        assert validation_batches(splits, 8, 2) == []  # 7 windows of 4 + 1, fewer than one batch of 8
        assert len(validation_batches(splits, 2, 5)) == 3
        assert validation_batches(splits, 4, 2, process_index=1, process_count=2) == []  # process 0 says it
        assert len(validation_batches(splits, 7, 1)) == 1  # as many as asked for: nothing to say
    assert [r.getMessage() for r in caplog.records][1:] == [
        "the validation split holds 30 tokens, 3 of the 5 batches of 2 sequences of 4 + 1 tokens asked for "
        "(train.eval_batches); the validation loss is their mean."]
    assert caplog.records[0].getMessage() == (
        "the validation split holds 30 tokens, fewer than one batch of 8 sequences of 4 + 1 tokens, so no validation "
        "loss will be reported; raise data.val_fraction or add a validation token file (format: tokens, split: "
        "validation).")


def _two_process_setup(tmp_path, monkeypatch):
    """A corpus, a tokenizer, a fresh cache, and a record of which thread reads which source."""
    monkeypatch.setenv("PHI2_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("phi2_jax.data.tokenize_once._POLL_S", 0.02)
    _corpus(tmp_path / "corpus")
    tokenizer_dir = str(train_bpe_tokenizer(["def g(x): return x"] * 20, 300, tmp_path / "tok"))
    readers = []
    real = read_source

    def recording(source, files=None):
        readers.append(threading.current_thread().name)
        return real(source, files)

    monkeypatch.setattr("phi2_jax.data.pipeline.read_source", recording)
    sources = [{"path": str(tmp_path / "corpus" / "*.py")}, {"path": str(tmp_path / "corpus" / "*.jsonl")}]
    return sources, tokenizer_dir, readers


def test_only_process_0_tokenizes_and_process_1_reads_its_cache(tmp_path, monkeypatch):
    sources, tokenizer_dir, readers = _two_process_setup(tmp_path, monkeypatch)
    results = {}

    def process_1():
        results[1] = build_splits(sources, tokenizer_dir, 8, 0.2, 300, process_index=1, process_count=2, wait_s=30)

    waiter = threading.Thread(target=process_1, name="process-1")
    waiter.start()  # before process 0 has begun: it waits
    time.sleep(0.2)
    assert waiter.is_alive() and readers == []
    results[0] = build_splits(sources, tokenizer_dir, 8, 0.2, 300, process_index=0, process_count=2, wait_s=30)
    waiter.join(timeout=30)
    assert set(readers) == {"MainThread"} and len(readers) == 2  # one pass per source, by process 0 only
    alone = build_splits(sources, tokenizer_dir, 8, 0.2, 300)  # a one-process run reads the same cache
    for result in results.values():
        for packed, expected in zip([*result.train, result.validation], [*alone.train, alone.validation]):
            np.testing.assert_array_equal(packed.tokens[:], expected.tokens[:])
    # A later job finds the cache done: process 1 reads no source and does not wait.
    readers.clear()
    build_splits(sources, tokenizer_dir, 8, 0.2, 300, process_index=1, process_count=2, wait_s=0.1)
    assert readers == []
    # Done, but the files are not here (a cache on each host's own disk): refused, not tokenized again.
    folder = tmp_path / "cache" / "tokens"
    for path in folder.glob("*.uint16"):
        path.unlink()
    with pytest.raises(ConfigError) as refused:
        build_splits(sources, tokenizer_dir, 8, 0.2, 300, process_index=1, process_count=2, wait_s=0.1)
    assert str(refused.value).endswith(
        f".uint16 is not in the token cache although process 0 has finished writing it, so {folder} is not shared "
        f"between the hosts; expected $PHI2_JAX_CACHE on a folder every host shares, or token files made beforehand "
        f"by python -m phi2_jax.pretokenize.")
    assert readers == [] and list(folder.glob("*.uint16")) == []


def test_process_0s_error_stops_the_others_at_once_and_is_forgotten_when_fixed(tmp_path, monkeypatch):
    sources, tokenizer_dir, readers = _two_process_setup(tmp_path, monkeypatch)
    record = json.dumps({"text": "y = x + 1\n" * 30})
    fixed = '{"text": "x = 1"}\n' + record + "\n"
    broken = '{"text": "x = 1"}\n{' + "b" * (len(record) - 2) + "}\n"  # the same size
    data = tmp_path / "corpus" / "rest.jsonl"
    data.write_text(broken)
    stat = data.stat()

    def job(index_errors):
        def process(index):
            try:
                build_splits(sources, tokenizer_dir, 8, 0.0, 300, process_index=index, process_count=2, wait_s=60)
            except ConfigError as error:
                index_errors[index] = str(error)

        waiting = threading.Event()
        real_stamp = tokenize_once._stamp

        def stamp(path):  # the waiter's first look (at an earlier job's failed file) is made: process 0 may start
            result = real_stamp(path)
            waiting.set()
            return result

        monkeypatch.setattr(tokenize_once, "_stamp", stamp)
        waiter = threading.Thread(target=process, args=(1,), name="process-1")
        waiter.start()  # waiting before process 0 begins
        assert waiting.wait(timeout=30)
        process(0)
        waiter.join(timeout=10)  # not the 60 s of silence
        assert not waiter.is_alive()

    errors = {}
    job(errors)
    assert errors == {0: f"{data} line 2 is not valid JSON (Expecting property name enclosed in double quotes at "
                         f"column 2).",
                      1: f"process 0 could not tokenize the text sources, so process 1 of 2 stops too: {errors[0]}"}
    assert set(readers) == {"MainThread"}
    assert sorted(p.suffix for p in (tmp_path / "cache" / "tokens").iterdir()) == [".failed", ".uint16"]  # *.py's
    # Fixed (same size and time, so the same job): the earlier failure left behind stops no one.
    data.write_text(fixed)
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    errors = {}
    job(errors)
    assert errors == {}


@pytest.mark.parametrize("stale_claim", [False, True], ids=["no-process-0", "process-0-died"])
def test_process_1_without_process_0s_cache_is_refused(tmp_path, monkeypatch, stale_claim):
    sources, tokenizer_dir, readers = _two_process_setup(tmp_path, monkeypatch)
    folder = tmp_path / "cache" / "tokens"
    if stale_claim:  # process 0 began (on this cache) and died without finishing
        folder.mkdir(parents=True)
        real_wait = tokenize_once._wait_for

        def wait_for(claim, *args):
            claim.write_text("process 0 of 2 on another host, pid 1\n")
            return real_wait(claim, *args)

        monkeypatch.setattr(tokenize_once, "_wait_for", wait_for)
    start = time.monotonic()
    with pytest.raises(ConfigError) as refused:
        build_splits(sources, tokenizer_dir, 8, 0.2, 300, process_index=1, process_count=2, wait_s=0.3)
    assert 0.3 <= time.monotonic() - start < 10
    assert str(refused.value) == (
        f"process 1 of 2 waited 0.3s for process 0 to tokenize the text sources into {folder} and saw no sign of it, "
        f"so that folder is not shared between the hosts (or the sources differ between them, or process 0 failed: "
        f"see its log); expected $PHI2_JAX_CACHE on a folder every host shares, or token files made beforehand by "
        f"python -m phi2_jax.pretokenize (data.sources with format: tokens).")
    assert readers == []  # it tokenized nothing
    assert [p.suffix for p in folder.iterdir()] == ([".claim"] if stale_claim else [])
