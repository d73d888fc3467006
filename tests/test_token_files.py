"""Token files: uint16 when the vocabulary fits, int32 otherwise, and .npy, all read alike by training's reader."""

import numpy as np
import pytest

from phi2_jax import ConfigError
from phi2_jax.data.pipeline import PackedSequences, build_splits
from phi2_jax.data.sources import Document
from phi2_jax.data.token_files import TokenArrays, TokenFile, token_suffix
from tests.hf_reference import train_bpe_tokenizer


class _ListTokenizer:
    """Each document's text is its ids, space-separated: the tokens written are known in advance."""

    def __init__(self, vocab_size, eos_id):
        self.vocab_size, self.eos_id, self.source = vocab_size, eos_id, "list"

    def encode_batch(self, texts):
        return [[int(t) for t in text.split()] for text in texts]


def test_the_suffix_is_uint16_exactly_when_every_id_fits():
    assert token_suffix(51_200) == ".uint16"   # Phi-2's vocabulary
    assert token_suffix(65_536) == ".uint16"   # ids 0..65535
    assert token_suffix(65_537) == ".int32"


def test_uint16_files_equal_int32_files_token_for_token_through_trainings_reader(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 51_200, rng.integers(1, 300)) for _ in range(600)]  # past TokenFile's batch of 256
    docs[3][:3] = [50_256, 51_199, 0]
    tokenizer = _ListTokenizer(51_200, eos_id=50_256)
    for suffix in (".uint16", ".int32"):
        with TokenFile(tmp_path / f"train{suffix}", tokenizer, "test") as out:
            for i, ids in enumerate(docs):
                out.add(Document(str(i), " ".join(map(str, ids))))
    expected = np.concatenate([np.append(d, 50_256) for d in docs])
    assert (tmp_path / "train.uint16").stat().st_size == 2 * len(expected)     # half the bytes
    assert (tmp_path / "train.int32").stat().st_size == 4 * len(expected)
    np.testing.assert_array_equal(np.fromfile(tmp_path / "train.uint16", np.uint16), expected)
    small, wide = TokenArrays([tmp_path / "train.uint16"]), TokenArrays([tmp_path / "train.int32"])
    np.testing.assert_array_equal(small[:], wide[:])
    a, b = PackedSequences(small, 64, 50_256), PackedSequences(wide, 64, 50_256)
    assert len(a) == len(b) == (len(expected) - 1) // 64
    for i in (0, 1, len(a) // 2, len(a) - 1):
        for key in a[i]:
            assert a[i][key].dtype == np.int32
            np.testing.assert_array_equal(a[i][key], b[i][key])


def test_uint16_int32_and_npy_sources_train_alike(tmp_path, monkeypatch):
    monkeypatch.setenv("PHI2_JAX_CACHE", str(tmp_path / "cache"))
    tokenizer_dir = train_bpe_tokenizer(["def g(x): return x"] * 20, 300, tmp_path / "tok")
    stream = np.random.default_rng(1).integers(0, 300, 5_000)
    stream[:2_500].astype(np.uint16).tofile(tmp_path / "a.uint16")   # a mix of all three formats
    stream[2_500:4_000].astype(np.int32).tofile(tmp_path / "b.int32")
    np.save(tmp_path / "c.npy", stream[4_000:].astype(np.int64))
    mixed = build_splits([{"path": str(tmp_path / "[abc].*"), "format": "tokens"}], str(tokenizer_dir), 8, 0.0, 300)
    np.testing.assert_array_equal(mixed.train[0].tokens[:], stream)
    np.testing.assert_array_equal(mixed.train[0][7]["input_ids"], stream[56:64])


def test_a_raw_file_of_a_partial_id_is_refused(tmp_path):
    (tmp_path / "cut.uint16").write_bytes(b"\x01\x00\x02")
    with pytest.raises(ConfigError, match=r"cut.uint16 holds 3 bytes, not a whole number of uint16 token ids"):
        TokenArrays([tmp_path / "cut.uint16"])
