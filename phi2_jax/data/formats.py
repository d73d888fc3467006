"""TRL's dataset conventions -> token ids with per-token loss weights.

Record kinds (field names configurable through `FieldNames`):
    language modelling   {"text": str}                                 every token counts
    prompt-completion    {"prompt": str, "completion": str}            completion tokens count
    conversational       {"messages": [{"role", "content"}, ...]}      assistant turns count
                         {"prompt": [messages], "completion": [messages]}
    preference           {"prompt", "chosen", "rejected"}: strings or message lists; a conversational
                         pair without "prompt" takes the messages chosen and rejected share as its prompt.

An example's `weights[i]` says whether predicting `ids[i]` counts in the loss
(the target convention: position i of the inputs `ids[:-1]` predicts `ids[i+1]`
with weight `weights[i+1]`). As TRL does, an end-of-text token follows every
plain-text completion or text; a chat template writes its own.

Conversations are rendered with the chat template and tokenized piece by
piece: text written by the template or the user, then each assistant turn
(the text between the template's generation prompt and the end of the turn),
so the prompt's tokens are exactly those a generation from that prompt would
see, and the assistant tokens are known without character offsets.

Length policy (seq_len = the model's input length T, so an example holds at
most T + 1 tokens: T inputs and T targets): a prompt longer than seq_len
leaves no room for one completion token; it is dropped and counted in
`FormatStats.dropped_long_prompt` (cutting an instruction makes a wrong
example); otherwise a too-long completion (or chosen / rejected) is cut on the
right, as TRL's default `truncation_mode='keep_start'` does, and counted in
`FormatStats.truncated`.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from phi2_jax.data.chat import ChatTemplate
from phi2_jax.data.tokenizer import Tokenizer
from phi2_jax.errors import UserInputError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")


@dataclasses.dataclass(frozen=True)
class FieldNames:
    """The record fields each convention reads; rename them to match your files."""

    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    chosen: str = "chosen"
    rejected: str = "rejected"


@dataclasses.dataclass
class FormatStats:
    """Counts of what the length policy and the checks did, for the run's log."""

    examples: int = 0
    dropped_long_prompt: int = 0
    truncated: int = 0
    chosen_equals_rejected: int = 0


@dataclasses.dataclass
class Example:
    """ids int32 [n]; weights float32 [n]: 1 where predicting ids[i] counts in the loss."""

    ids: np.ndarray
    weights: np.ndarray


@dataclasses.dataclass
class PreferencePair:
    """A prompt's ids and the two responses' ids (each ending as the template or EOS ends it)."""

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray

    def rows(self) -> tuple[Example, Example]:
        """(prompt + chosen, prompt + rejected), the response tokens weighted 1."""
        return tuple(Example(np.concatenate([self.prompt, r]).astype(np.int32),
                             np.concatenate([np.zeros(len(self.prompt)), np.ones(len(r))]).astype(np.float32))
                     for r in (self.chosen, self.rejected))


def record_kind(record: dict, fields: FieldNames = FieldNames(), where: str = "record") -> str:
    """'preference', 'prompt_completion', 'conversational' or 'language_modeling', by the fields present."""
    if not isinstance(record, dict):
        raise UserInputError(f"{where} is {type(record).__name__}; expected a JSON object.")
    if fields.chosen in record or fields.rejected in record:
        _require(record, (fields.chosen, fields.rejected), where)
        return "preference"
    if fields.prompt in record or fields.completion in record:
        _require(record, (fields.prompt, fields.completion), where)
        return "prompt_completion"
    if fields.messages in record:
        return "conversational"
    if fields.text in record:
        return "language_modeling"
    raise UserInputError(
        f"{where} has none of the expected fields (it has {sorted(record)}); expected '{fields.text}', "
        f"'{fields.messages}', '{fields.prompt}' + '{fields.completion}', or '{fields.chosen}' + '{fields.rejected}'.")


def _require(record: dict, names: tuple[str, ...], where: str) -> None:
    missing = [n for n in names if n not in record or record[n] is None]
    if missing:
        raise UserInputError(f"{where} has no '{missing[0]}' field; expected all of {list(names)}.")


def check_messages(messages, where: str, field: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        what = "an empty list" if isinstance(messages, list) else type(messages).__name__
        raise UserInputError(f"{where}: '{field}' is {what}; expected a non-empty list of messages.")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UserInputError(f"{where}: '{field}'[{index}] is not a {{'role', 'content'}} message.")
        if message["role"] not in ROLES:
            raise UserInputError(f"{where}: '{field}'[{index}] has unknown role {message['role']!r}; "
                                 f"expected one of {', '.join(ROLES)}.")
    return messages


class Formatter:
    """Turns records into examples with one tokenizer, chat template, seq_len and set of field names."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate, seq_len: int, fields: FieldNames = FieldNames(),
                 count_prompt: bool = False):
        self.tokenizer, self.template, self.seq_len, self.fields = tokenizer, template, seq_len, fields
        self.count_prompt = count_prompt  # SFT option: the prompt's tokens count in the loss too
        self.eos_text = tokenizer.decode([tokenizer.eos_id])
        self.stats = FormatStats()

    # ------------------------------------------------------------------ pieces
    def _render(self, messages: list[dict], where: str, generation_prompt: bool = False) -> str:
        try:
            return self.template.render(messages, add_generation_prompt=generation_prompt)
        except UserInputError as error:
            raise UserInputError(f"{where}: {error}") from None

    def _conversation_pieces(self, messages: list[dict], where: str) -> list[tuple[str, bool]]:
        """[(text, is_assistant)] whose concatenation is the rendered conversation."""
        pieces, done = [], ""
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:index], where, generation_prompt=True) if index else ""
            after = self._render(messages[:index + 1], where)
            if not (before.startswith(done) and after.startswith(before)):
                raise UserInputError(f"{where}: the chat template ({self.template.source}) does not render a "
                                     f"conversation's turns as prefixes of it, so assistant turns cannot be located.")
            pieces += [(before[len(done):], False), (after[len(before):], True)]
            done = after
        full = self._render(messages, where)
        if not full.startswith(done):
            raise UserInputError(f"{where}: the chat template ({self.template.source}) does not render a "
                                 f"conversation's turns as prefixes of it, so assistant turns cannot be located.")
        pieces.append((full[len(done):], False))
        return [(text, counted) for text, counted in pieces if text]

    def _prompt_and_response(self, prompt: list[dict], response: list[dict], where: str) -> tuple[str, str]:
        """(prompt rendered with the generation prompt, the text the response adds after it)."""
        prompt_text = self._render(prompt, where, generation_prompt=True)
        full = self._render([*prompt, *response], where)
        if not full.startswith(prompt_text):
            raise UserInputError(f"{where}: the chat template ({self.template.source}) does not render the "
                                 f"prompt as a prefix of the conversation, so the response cannot be located.")
        return prompt_text, full[len(prompt_text):]

    def _encode_pieces(self, pieces: list[tuple[str, bool]]) -> Example:
        ids, weights = [], []
        for text, counted in pieces:
            piece = self.tokenizer.encode(text)
            ids += piece
            weights += [1.0 if counted else 0.0] * len(piece)
        return Example(np.asarray(ids, np.int32), np.asarray(weights, np.float32))

    def _text(self, value, where: str, field: str) -> str:
        if not isinstance(value, str):
            raise UserInputError(f"{where}: '{field}' is {type(value).__name__}; expected a string.")
        return value

    def _with_eos(self, text: str) -> str:
        return text if text.endswith(self.eos_text) else text + self.eos_text

    def _fit(self, example: Example, prompt_length: int, where: str) -> Example | None:
        """The length policy (module docstring): None for a dropped example."""
        if prompt_length > self.seq_len:
            self.stats.dropped_long_prompt += 1
            return None
        if len(example.ids) > self.seq_len + 1:
            self.stats.truncated += 1
            example = Example(example.ids[:self.seq_len + 1], example.weights[:self.seq_len + 1])
        self.stats.examples += 1
        return example

    # ------------------------------------------------------------------ public
    def sft_example(self, record: dict, where: str = "record") -> Example | None:
        """One SFT example (or None if the length policy drops it) from a text, prompt-completion or chat record."""
        f, kind = self.fields, record_kind(record, self.fields, where)
        if kind == "preference":
            raise UserInputError(f"{where} is a preference record ('{f.chosen}'/'{f.rejected}'); "
                                 f"SFT expects '{f.text}', '{f.messages}' or '{f.prompt}' + '{f.completion}'.")
        if kind == "language_modeling":
            text = self._text(record[f.text], where, f.text)
            if not text:
                raise UserInputError(f"{where}: '{f.text}' is empty; expected some text.")
            return self._fit(self._encode_pieces([(self._with_eos(text), True)]), 0, where)
        if kind == "conversational":
            messages = check_messages(record[f.messages], where, f.messages)
            if not any(m["role"] == "assistant" and m["content"] for m in messages):
                raise UserInputError(f"{where}: '{f.messages}' has no non-empty assistant turn to learn from.")
            pieces = self._conversation_pieces(messages, where)
        else:
            prompt, completion = record[f.prompt], record[f.completion]
            if isinstance(prompt, list) or isinstance(completion, list):
                prompt = check_messages(prompt, where, f.prompt)
                completion = check_messages(completion, where, f.completion)
                if not any(m["content"] for m in completion):
                    raise UserInputError(f"{where}: '{f.completion}' is empty; expected a response to learn from.")
                # As TRL: only the completion counts, even an assistant turn inside the prompt.
                pieces = list(zip(self._prompt_and_response(prompt, completion, where), (False, True)))
            else:
                prompt, completion = self._text(prompt, where, f.prompt), self._text(completion, where, f.completion)
                if not completion:
                    raise UserInputError(f"{where}: '{f.completion}' is empty; expected a response to learn from.")
                pieces = [(prompt, False), (self._with_eos(completion), True)]
        example = self._encode_pieces(pieces)
        if not example.weights.any():  # e.g. a template that leaves the assistant's content out
            raise UserInputError(f"{where}: the chat template ({self.template.source}) renders no text for the "
                                 f"response; expected the assistant's content in the rendered conversation.")
        prompt_length = int(np.argmax(example.weights > 0))
        if self.count_prompt:
            example.weights[:] = 1.0
        return self._fit(example, prompt_length, where)

    def preference_pair(self, record: dict, where: str = "record") -> PreferencePair | None:
        """One chosen/rejected pair (or None if the length policy drops it) from a preference record."""
        f = self.fields
        if record_kind(record, f, where) != "preference":
            raise UserInputError(f"{where} is not a preference record; DPO expects '{f.chosen}' and '{f.rejected}' "
                                 f"(and '{f.prompt}' unless they are conversations sharing their first messages).")
        chosen, rejected, prompt = record[f.chosen], record[f.rejected], record.get(f.prompt)
        for name, value in ((f.chosen, chosen), (f.rejected, rejected)):
            if not value:
                raise UserInputError(f"{where}: '{name}' is empty; expected a response.")
        if isinstance(chosen, list) or isinstance(rejected, list) or isinstance(prompt, list):
            chosen, rejected = check_messages(chosen, where, f.chosen), check_messages(rejected, where, f.rejected)
            if prompt is None:  # implicit prompt: the messages both responses share
                shared = 0
                while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
                    shared += 1
                if not shared:
                    raise UserInputError(f"{where} has no '{f.prompt}' and its '{f.chosen}' and '{f.rejected}' share no "
                                         f"first messages to take as one; expected a '{f.prompt}' field.")
                prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
            prompt = check_messages(prompt, where, f.prompt)
            prompt_text, chosen_text = self._prompt_and_response(prompt, chosen, where)
            responses = [chosen_text, self._prompt_and_response(prompt, rejected, where)[1]]
        else:
            if prompt is None:
                raise UserInputError(f"{where} has no '{f.prompt}' field; a plain-text preference pair needs one.")
            prompt_text = self._text(prompt, where, f.prompt)
            responses = [self._with_eos(self._text(r, where, n)) for r, n in ((chosen, f.chosen), (rejected, f.rejected))]
        if not responses[0] or not responses[1]:
            raise UserInputError(f"{where}: the chat template ({self.template.source}) renders no text for the "
                                 f"response; expected the assistant's content in the rendered conversation.")
        if responses[0] == responses[1]:
            self.stats.chosen_equals_rejected += 1
            if self.stats.chosen_equals_rejected == 1:  # the first, by place; the rest in build_post_splits' count
                log.warning("%s: '%s' equals '%s'; the pair teaches nothing (its DPO loss gradient is zero).",
                            where, f.chosen, f.rejected)
        prompt_ids = np.asarray(self.tokenizer.encode(prompt_text), np.int32)
        if len(prompt_ids) > self.seq_len:
            self.stats.dropped_long_prompt += 1
            return None
        room = self.seq_len + 1 - len(prompt_ids)
        ids = [np.asarray(self.tokenizer.encode(r), np.int32) for r in responses]
        if any(len(r) > room for r in ids):
            self.stats.truncated += 1
        self.stats.examples += 1
        return PreferencePair(prompt_ids, ids[0][:room], ids[1][:room])
