"""Tokenizers behind one small interface: Hugging Face `tokenizer.json` or a sentencepiece model.

Phi-2 itself uses CodeGen's byte-level BPE (`tokenizer.json` in the model
folder, `<|endoftext|>` = 50256 as bos/eos, no BOS prepended). The default
training run uses a sentencepiece model trained on the Python standard
library, cached after the first run.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from phi2_jax.errors import ConfigError


class Tokenizer:
    """encode(text) -> ids (no BOS added), decode(ids) -> text, vocab_size, eos_id."""

    vocab_size: int
    eos_id: int
    source: str

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def decode_continuation(self, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
        """The text `new_ids` add after the prompt: decode(prompt + new) less decode(prompt).

        Decoding the new ids alone is not the same: sentencepiece drops the leading
        space of the first piece of whatever it decodes ('import' then '▁_' would
        read 'import_'), and a byte token may complete a character begun in the prompt.
        """
        shown = self.decode(prompt_ids)
        full = self.decode([*prompt_ids, *new_ids])
        return full[len(shown):] if full.startswith(shown) else self.decode(new_ids)


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (e.g. Phi-2's CodeGen BPE with its added whitespace tokens)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        try:
            self._tok = _Tok.from_file(str(file))
        except Exception as error:  # the Rust side raises a plain Exception
            raise ConfigError(f"{file} could not be read as a Hugging Face tokenizer.json ({error}).") from None
        self.source = str(file)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eos = next((t for t in ("<|endoftext|>", "</s>", "<eos>") if self._tok.token_to_id(t) is not None), None)
        if eos is None:
            raise ConfigError(f"{file} has no end-of-text token; expected '<|endoftext|>', '</s>' or '<eos>'.")
        self.eos_id = self._tok.token_to_id(eos)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.source = str(path)
        if not Path(path).is_file():
            raise ConfigError(f"{path} does not exist; expected a sentencepiece .model file.")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as error:
            raise ConfigError(f"{path} could not be read as a sentencepiece model ({error}).") from None
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ConfigError(f"{path} has no end-of-sequence piece; expected a model trained with eos_id set.")

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a model folder / `tokenizer.json` (Hugging Face) or a `.model` file (sentencepiece)."""
    path = Path(path)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".json" or (path.is_dir() and (path / "tokenizer.json").is_file()):
        return HFTokenizer(path)
    raise ConfigError(f"{path} is neither a tokenizer.json, a folder holding one, nor a sentencepiece .model file.")


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, folder: str | Path) -> Path:
    """A byte-level BPE tokenizer like Phi-2's (`<|endoftext|>` its one special token) trained on `texts`, written
    to `folder` as tokenizer.json + tokenizer_config.json, the files transformers and `load_tokenizer` read.

    For small experiments with post-training, whose chat templates write the end-of-text token as text:
    a sentencepiece model's end-of-sequence piece has no text to write.
    """
    import json

    from tokenizers import Tokenizer as Tokenizers, decoders, models, pre_tokenizers, trainers

    tok = Tokenizers(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
         "add_bos_token": False, "clean_up_tokenization_spaces": False}, indent=2))
    return folder


def cache_dir() -> Path:
    root = os.environ.get("PHI2_JAX_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "phi2_jax"
    return Path(root)


_TOKENIZER_TRAINING_LINES = 200_000


def train_sentencepiece(corpus: Callable[[], Iterable[str]], vocab_size: int, name: str,
                        corpus_key: str | None = None, may_train: bool = True) -> Path:
    """Trains (or reuses from the cache) a BPE sentencepiece model on the texts of `corpus()`; returns its .model path.

    `corpus()` yields the texts afresh each time it is called (`lambda: texts` for
    a list): they are streamed, never all held in memory. The cache key covers the
    vocab size and the corpus: `corpus_key` if the caller has a cheaper name for
    its contents (the data pipeline's file fingerprints), else a hash of every
    text, so a changed corpus never silently reuses a stale tokenizer. With
    `may_train` False (a process that only reads what process 0 made) a model
    missing from the cache is refused instead of trained.
    """
    import sentencepiece as spm

    if corpus_key is None:
        contents = hashlib.sha256()
        for text in corpus():
            contents.update(hashlib.sha256(text.encode()).digest())
        corpus_key = contents.hexdigest()
    # "seeded-sample": tokenizers cached before the sample had a fixed seed (below) are not reused.
    digest = hashlib.sha256(f"{vocab_size} seeded-sample|{corpus_key}".encode())
    out = cache_dir() / "tokenizers" / f"{name}-{vocab_size}-{digest.hexdigest()[:12]}"
    model = out.with_suffix(".model")
    if model.is_file():
        return model
    if not may_train:
        raise ConfigError(f"{model} is not in the cache although process 0 has finished training it, so "
                          f"{model.parent} is not shared between the hosts; expected $PHI2_JAX_CACHE on a folder every "
                          f"host shares, or a tokenizer given as data.tokenizer.")
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = _sampled_lines(corpus, _TOKENIZER_TRAINING_LINES)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp), vocab_size=vocab_size, model_type="bpe",
        input_sentence_size=0, shuffle_input_sentence=False, character_coverage=1.0, byte_fallback=True,
        split_digits=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, user_defined_symbols=["\n", "    ", "\t"],
        pad_id=-1, unk_id=0, bos_id=-1, eos_id=1, num_threads=os.cpu_count() or 1, minloglevel=2,
    )
    # Atomic publish: a concurrent process either sees the finished file or trains its own.
    os.replace(f"{tmp}.model", model)
    Path(f"{tmp}.vocab").unlink(missing_ok=True)
    return model


def _sampled_lines(corpus: Callable[[], Iterable[str]], limit: int) -> list[str]:
    """The corpus's non-blank lines, or `limit` of them drawn with a fixed seed, in corpus order.

    Sentencepiece trains on lines; code lines are short, so a sample is enough. It
    is drawn here with a fixed seed: sentencepiece's own sampling and shuffling use
    an unseeded generator, so the same corpus gave a different tokenizer, and a
    different loss curve, in every fresh process.
    """
    def lines():
        return (line for text in corpus() for line in text.splitlines() if line.strip())

    count = sum(1 for _ in lines())
    if count <= limit:
        return list(lines())
    keep = np.sort(np.random.default_rng(0).choice(count, limit, replace=False))
    sample, wanted = [], iter(keep)
    next_index = next(wanted)
    for index, line in enumerate(lines()):
        if index == next_index:
            sample.append(line)
            next_index = next(wanted, -1)
            if next_index < 0:
                break
    return sample
