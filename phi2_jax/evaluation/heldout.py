"""Held-out prompt-completion pairs: how likely the model finds each completion, and whether it says it.

Input: JSON Lines in TRL's conventions, one pair per line:
    {"prompt": str, "completion": str}                              plain: the prompt is used as it is
    {"prompt": [messages], "completion": [messages]}                conversational
    {"messages": [..., {"role": "assistant", ...}]}                 the last (assistant) turn is the completion

Tokens are those training sees (`data/formats.py`, `Formatter.sft_example`): a conversational prompt is
rendered with the model folder's chat template (or Phi-2's built-in one) and its generation prompt,
the completion is the text the template adds after it (end-of-text and all); a plain completion gets
an end-of-text token after it, as TRL adds one. A `messages` record is read as the prompt-completion
record {"prompt": messages[:-1], "completion": messages[-1:]}.

Scores over a file's pairs:
    loglik            mean over pairs of sum log p(completion tokens | prompt tokens)
    loglik_per_token  the sum over all pairs / all completion tokens (minus the eval loss of SFT)
    exact_match       share of pairs whose greedy generation from the prompt tokens, cut at the
                      end-of-text token or at STOP, equals the answer (both stripped of whitespace);
                      the answer is the plain completion, or the first assistant turn's content
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from phi2_jax.data.chat import ChatTemplate
from phi2_jax.data.formats import Formatter, record_kind
from phi2_jax.data.tokenizer import Tokenizer
from phi2_jax.errors import UserInputError
from phi2_jax.inference.generate import generate_after_ids
from phi2_jax.inference.scoring import loglikelihood
from phi2_jax.util.jsonl import jsonl_objects
from phi2_jax.util.progress import Progress

SAMPLE = Path(__file__).parent / "samples" / "heldout.jsonl"

# Phi-2's built-in template starts the next turn with "Instruct:"; a model that does not stop at its
# end-of-text token would go on to ask itself the next question.
STOP = ("\nInstruct:",)

# Formatter's length policy drops or cuts examples longer than seq_len; held-out pairs are scored whole
# (scoring keeps the completion and the nearest prompt tokens when a pair exceeds the model's context).
_NO_LIMIT = 1 << 40


@dataclasses.dataclass(frozen=True)
class HeldoutPair:
    """prompt / completion: token ids (as training tokenizes them); answer: the text exact match expects."""

    prompt: tuple[int, ...]
    completion: tuple[int, ...]
    answer: str


def read_pairs(path: str | Path, tokenizer: Tokenizer, template: ChatTemplate) -> list[HeldoutPair]:
    """The pairs of a held-out JSONL file; one sentence naming the file and line for a bad record."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"held-out file {path} does not exist; expected JSON Lines of prompt-completion pairs.")
    formatter = Formatter(tokenizer, template, seq_len=_NO_LIMIT)
    pairs = [_pair(formatter, record, f"{path} line {line}") for line, record in jsonl_objects(path)]
    if not pairs:
        raise UserInputError(f"held-out file {path} holds no pairs; expected one JSON object per line.")
    return pairs


def _pair(formatter: Formatter, record: dict, where: str) -> HeldoutPair:
    kind = record_kind(record, formatter.fields, where)
    if kind not in ("prompt_completion", "conversational"):
        raise UserInputError(f"{where} is a {kind.replace('_', ' ')} record; a held-out pair needs 'prompt' + "
                             f"'completion' or 'messages' ending in an assistant turn.")
    if kind == "conversational":
        messages = record["messages"]
        if not (isinstance(messages, list) and len(messages) >= 2 and isinstance(messages[-1], dict)
                and messages[-1].get("role") == "assistant"):
            raise UserInputError(f"{where}: 'messages' must hold a prompt and end in an assistant turn, "
                                 f"the completion to score.")
        record = {"prompt": messages[:-1], "completion": messages[-1:]}
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and not prompt:
        raise UserInputError(f"{where}: 'prompt' is empty; expected the text the completion answers.")
    answer = _answer(completion, formatter.eos_text, where)
    example = formatter.sft_example(record, where)  # training's checks, template and tokens
    assert example is not None  # no length limit: nothing is dropped
    start = int(np.argmax(example.weights > 0))
    assert example.weights[start:].all(), "a prompt-completion example counts its completion only"
    return HeldoutPair(tuple(example.ids[:start].tolist()), tuple(example.ids[start:].tolist()), answer)


def _answer(completion, eos_text: str, where: str) -> str:
    """The text greedy generation should produce: the completion less its end-of-text, or its first turn's content.

    Other types are left to `Formatter.sft_example`, which refuses them in training's words.
    """
    if not isinstance(completion, list):
        return completion.removesuffix(eos_text).strip() if isinstance(completion, str) else ""
    turn = next((m for m in completion if isinstance(m, dict) and m.get("role") == "assistant"), None)
    if turn is None or not isinstance(turn.get("content"), str):
        raise UserInputError(f"{where}: 'completion' has no assistant turn with text content; expected one to "
                             f"compare generations with.")
    return turn["content"].strip()


def score_heldout(model, tokenizer: Tokenizer, pairs: list[HeldoutPair], max_new_tokens: int, batch_size: int) -> dict:
    """loglik, loglik_per_token and exact_match over `pairs` (module docstring), with per-pair details."""
    scored = loglikelihood(model, [(p.prompt, p.completion) for p in pairs], eos_id=tokenizer.eos_id,
                           batch_size=batch_size)
    progress = Progress("  generating", len(pairs))
    generated = []
    for begin in range(0, len(pairs), batch_size):
        # From the prompt's token ids, not its text: the tokens training conditioned the completion on.
        chunk = [p.prompt for p in pairs[begin:begin + batch_size]]
        generated += generate_after_ids(model, tokenizer, chunk, max_new_tokens=max_new_tokens, stop=STOP)
        progress.advance(len(chunk))
    progress.close()
    items = [{"loglik": ll, "tokens": len(p.completion), "answer": p.answer, "generated": g,
              "match": g.strip() == p.answer} for (ll, _), p, g in zip(scored, pairs, generated)]
    tokens = sum(i["tokens"] for i in items)
    return {"loglik": float(np.mean([i["loglik"] for i in items])),
            "loglik_per_token": sum(i["loglik"] for i in items) / tokens,
            "exact_match": sum(i["match"] for i in items) / len(items), "n": len(items), "tokens": tokens,
            "items": items}
