"""Post-training data: records (JSONL / Parquet) -> formatted examples -> rows, served like pre-training's.

    data.sources (each {path, format: auto|jsonl|parquet, weight})
      -> records, each named "<file> line <n>" (or "row <n>"), split train / validation by a hash of that name
      -> `formats.Formatter`: TRL's conventions + the chat template -> ids with loss weights (SFT) or
         prompt / chosen / rejected ids (DPO), with the length policy of `formats.py`
      -> rows: SFT examples packed whole into rows of seq_len (`post_batches.pack_examples`: segment ids and
         restarting positions keep packed examples apart); DPO pairs side by side (`preference_rows`)
      -> `RowSource`, a random-access Grain source that `pipeline.train_dataset` shuffles, mixes by
         weight, shards per process and batches exactly as it does packed text.

Every process formats every record (the same rows everywhere; Grain then takes this process's share);
post-training sets are small next to a pre-training corpus, and formatting is a tokenizer pass.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from phi2_jax.data.chat import ChatTemplate, load_chat_template, read_template_text
from phi2_jax.data.formats import FieldNames, Formatter, FormatStats, PreferencePair
from phi2_jax.data.pipeline import Splits
from phi2_jax.data.post_batches import pack_examples, preference_rows
from phi2_jax.data.sources import Document, is_validation, open_parquet, source_files
from phi2_jax.data.tokenizer import Tokenizer, load_tokenizer
from phi2_jax.errors import ConfigError
from phi2_jax.util.jsonl import jsonl_objects

log = logging.getLogger(__name__)


class RowSource:
    """Random access over equal-length arrays {key: [N, ...]}: row i is {key: array[i]} (a Grain data source)."""

    def __init__(self, rows: dict[str, np.ndarray], what: str = "rows"):
        lengths = {len(v) for v in rows.values()}
        assert len(lengths) <= 1, f"rows of different lengths: {lengths}"
        self.rows, self.what = rows, what
        self._len = lengths.pop() if lengths else 0

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[index] for k, v in self.rows.items()}

    @property
    def amount(self) -> str:
        return f"{self._len} {self.what}"

    @property
    def unit(self) -> str:
        return self.what


@dataclasses.dataclass
class PostSplits(Splits):
    """`pipeline.Splits` of post-training rows, with the chat template the rows were rendered with."""

    template: ChatTemplate = None
    stats: FormatStats = None
    sample_prompts: list = None  # a few prompts' ids, held-out ones first, for the trainer's closing samples

    more_validation = "raise data.val_fraction (post-training holds out that share of its records)"


def read_records(source: dict) -> Iterator[tuple[str, dict]]:
    """(name, record) for every record of a JSONL or Parquet source, one file at a time."""
    for file in source_files(source):
        fmt = source.get("format", "auto")
        kind = fmt if fmt != "auto" else {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(
            Path(file).suffix)
        if kind == "jsonl":
            for n, record in jsonl_objects(Path(file), ConfigError):
                yield f"{file} line {n}", record
        elif kind == "parquet":
            yield from _parquet_records(file)
        else:
            raise ConfigError(f"data source file {file} is neither .jsonl nor .parquet; post-training reads records "
                              f"in TRL's conventions (set the source's format: jsonl or parquet if the suffix differs).")


def _parquet_records(file: str) -> Iterator[tuple[str, dict]]:
    n = 0
    for batch in open_parquet(file).iter_batches():  # one record batch in memory at a time
        for record in batch.to_pylist():
            yield f"{file} row {n}", record
            n += 1


def post_tokenizer(spec: str, init_from: str, writes_eos_as_text: bool = True) -> Tokenizer:
    """The tokenizer of `data.tokenizer`, or with 'auto' the one of the model post-training starts from.

    Chat templates and completions end with the end-of-text token written as text, so (`writes_eos_as_text`)
    that text must encode to the one token: a sentencepiece `.model` (whose end-of-sequence piece has no
    text) is refused. GRPO samples its completions and never writes the token as text.
    """
    if spec == "auto":
        if not init_from:
            raise ConfigError("post-training (train.objective sft, dpo or grpo) starts from a trained model; expected "
                              "checkpoint.init_from (a Hugging Face folder, a converted checkpoint or a run folder) "
                              "or data.tokenizer.")
        from phi2_jax.hf.loading import default_tokenizer_path

        spec = str(default_tokenizer_path(Path(init_from)))
    tokenizer = load_tokenizer(spec)
    eos_text = tokenizer.decode([tokenizer.eos_id])
    if writes_eos_as_text and not eos_text or tokenizer.encode(eos_text) != [tokenizer.eos_id]:
        raise ConfigError(f"tokenizer {tokenizer.source} does not encode its end-of-text token's text "
                          f"{eos_text!r} as that one token, which chat templates and completions end with; expected "
                          f"a Hugging Face tokenizer.json (phi2-convert to-hf writes one for a sentencepiece run).")
    return tokenizer


def chat_template(spec: str, tokenizer: Tokenizer, init_from: str = "") -> ChatTemplate:
    """data.chat_template: '' = the template the model `init_from` carries (a run's or an export's
    chat_template.jinja), else the tokenizer folder's (or Phi-2's built-in); else a .jinja file or a folder."""
    eos = tokenizer.decode([tokenizer.eos_id])
    if not spec:
        folder = Path(tokenizer.source)
        own = load_chat_template(folder if folder.is_dir() else folder.parent, eos_token=eos)
        # A run records the tokenizer it read, not the template it trained with (data.chat_template may have
        # named another): the model renders conversations as it learned them, as evaluate and exports do.
        carried = Path(init_from) / "chat_template.jinja" if init_from else None
        if carried is not None and carried.is_file():
            return ChatTemplate(read_template_text(carried), own.special_tokens, str(carried))
        return own
    path = Path(spec)
    if path.is_dir():
        return load_chat_template(path, eos_token=eos)
    if path.is_file():
        template = load_chat_template(None, eos_token=eos)
        return ChatTemplate(read_template_text(path), template.special_tokens, str(path))
    raise ConfigError(f"data.chat_template {spec} does not exist; expected a .jinja file, a folder holding "
                      f"chat_template.jinja or tokenizer_config.json, or '' for the tokenizer's own.")


def build_post_splits(sources: list[dict], tokenizer: Tokenizer, template: ChatTemplate, objective: str, seq_len: int,
                      val_fraction: float, fields: dict[str, str] | None = None, count_prompt: bool = False,
                      max_documents: int = 0) -> PostSplits:
    """Formats every record of every source into training rows (one RowSource per source) and validation rows."""
    formatter = Formatter(tokenizer, template, seq_len, FieldNames(**(fields or {})), count_prompt=count_prompt)
    make = formatter.sft_example if objective == "sft" else formatter.preference_pair
    train_sets, weights, held_out = [], [], []
    for source in sources:
        if source.get("split") is not None or source.get("field") is not None:
            key = "split" if source.get("split") is not None else "field"
            raise ConfigError(f"data source '{source.get('path')}': '{key}' belongs to text and token sources; "
                              f"post-training records are split by data.val_fraction and name their fields in "
                              f"data.fields.")
        train = []
        records = read_records(source)
        for name, record in itertools.islice(records, max_documents) if max_documents else records:
            item = make(record, name)
            if item is not None:
                (held_out if is_validation(Document(name, ""), val_fraction) else train).append(item)
        if not train:
            raise ConfigError(f"data source '{source.get('path')}' has no training records left (formatted "
                              f"{formatter.stats.examples}, dropped {formatter.stats.dropped_long_prompt} with a "
                              f"prompt longer than data.seq_len {seq_len}); expected at least one.")
        train_sets.append(_rows(train, objective, seq_len, tokenizer.eos_id))
        weights.append(float(source.get("weight", 1.0)))
    stats = formatter.stats
    log.info("post-training data: %d %s examples (%d held out), %d dropped (prompt longer than data.seq_len %d), "
             "%d truncated on the right, %d with chosen equal to rejected; chat template: %s", stats.examples,
             objective, len(held_out), stats.dropped_long_prompt, seq_len, stats.truncated,
             stats.chosen_equals_rejected, template.source)
    if stats.chosen_equals_rejected > 1:
        log.warning("%d preference pairs have chosen equal to rejected (the first is named above); they teach "
                    "nothing.", stats.chosen_equals_rejected)
    validation = _rows(held_out, objective, seq_len, tokenizer.eos_id)
    prompts = [p for p in map(_prompt_ids, held_out + train) if p is not None][:3]
    return PostSplits(train_sets, weights, validation, tokenizer, template=template, stats=stats,
                      sample_prompts=prompts)


def _prompt_ids(item) -> list[int] | None:
    """The prompt of an SFT example (its tokens before the first counted one) or of a preference pair."""
    if isinstance(item, PreferencePair):
        return item.prompt.tolist()
    counted = np.flatnonzero(item.weights > 0)
    return item.ids[:counted[0]].tolist() if len(counted) and counted[0] > 0 else None


def _rows(items: list, objective: str, seq_len: int, pad_id: int) -> RowSource:
    if objective == "sft":
        return RowSource(pack_examples(items, seq_len, pad_id) if items else {}, f"packed rows of {seq_len} tokens")
    return RowSource(preference_rows(items, seq_len, pad_id) if items else {}, "preference pairs")
