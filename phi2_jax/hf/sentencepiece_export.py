"""A sentencepiece `.model` as a Hugging Face `tokenizer.json` that encodes to the same ids.

The default training run tokenizes with sentencepiece (BPE, byte fallback,
no normalisation, user-defined pieces for newline, tab and four spaces);
transformers loads a tokenizer from `tokenizer.json`. This builds that file
with the `tokenizers` library from the model's own settings: the BPE merges
ranked by piece score (only normal pieces merge), the dummy-prefix and
whitespace escaping of the normaliser, user-defined pieces kept whole, and
byte fallback. The tests compare its ids with sentencepiece's on real code.
Only BPE models are converted; a unigram model is refused with a reason.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class NotConvertible(Exception):
    """Why a sentencepiece model cannot be written as tokenizer.json (one clause, for a message)."""


def _read_proto(model_file: Path):
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:  # it needs the protobuf runtime, which sentencepiece does not require
        raise NotConvertible("reading a sentencepiece model's settings needs the protobuf package") from None
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as error:  # protobuf's DecodeError, or an OSError
        raise NotConvertible(f"{model_file} is not a sentencepiece model ({error})") from None
    return proto


def build_tokenizer(model_file: str | Path):
    """A `tokenizers.Tokenizer` that encodes and decodes as `SentencePieceProcessor(model_file)` does."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    model_file = Path(model_file)
    proto = _read_proto(model_file)
    if proto.trainer_spec.model_type != 2:
        raise NotConvertible(f"{model_file.name} is a sentencepiece unigram model; only BPE models are converted")
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == NORMAL}
    # sentencepiece merges the adjacent pair whose merged piece scores highest: rank merges by that score
    ranked = sorted((-score, i, piece[:k], piece[k:]) for piece, (score, i) in normal.items()
                    for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal)
    user_defined = [p.piece for p in pieces if p.type == USER_DEFINED]
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in ranked],
                              unk_token=proto.trainer_spec.unk_piece, fuse_unk=True,
                              byte_fallback=proto.trainer_spec.byte_fallback, ignore_merges=bool(user_defined)))
    spec = proto.normalizer_spec
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:  # only spaces: sentencepiece leaves newlines alone
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if spec.add_dummy_prefix:
        # Metaspace skips its prefix when the text already starts with '▁'; sentencepiece does not
        steps.append(normalizers.Replace(Regex(r"\A▁"), "▁▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    splits = []
    if spec.add_dummy_prefix:
        splits.append(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False))
    if user_defined:  # emitted whole, never merged with their neighbours
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        splits.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    if splits:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(splits)
    steps = [decoders.Replace("▁", " ")]
    if proto.trainer_spec.byte_fallback:
        steps.append(decoders.ByteFallback())
    if spec.add_dummy_prefix:
        steps += [decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    elif proto.trainer_spec.byte_fallback:
        steps.append(decoders.Fuse())
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer, proto


def export(model_file: str | Path, folder: Path, model_max_length: int) -> list[str]:
    """Writes `tokenizer.json` and `tokenizer_config.json` for `model_file` into `folder`; returns the file names.

    Raises `NotConvertible` (with the reason) for a model this cannot express.
    """
    tokenizer, proto = build_tokenizer(model_file)
    tokenizer.save(str(folder / "tokenizer.json"))
    pieces = list(proto.pieces)
    spec = proto.trainer_spec
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,  # the run trained on text with no BOS prepended
        "add_eos_token": False,
    }
    for key, index in (("unk_token", spec.unk_id), ("eos_token", spec.eos_id), ("bos_token", spec.bos_id),
                       ("pad_token", spec.pad_id)):
        if 0 <= index < len(pieces):
            config[key] = pieces[index].piece
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return ["tokenizer.json", "tokenizer_config.json"]
