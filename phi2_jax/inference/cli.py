"""`python -m phi2_jax.generate`: streams a continuation of one prompt, or prints those of several.

    python -m phi2_jax.generate --model PATH --prompt "def f(x):" [--prompt-file F] [--max-new-tokens 64] ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from phi2_jax.errors import UserInputError, exit_on_user_error
from phi2_jax.hf.loading import default_tokenizer_path
from phi2_jax.inference.generate import Sampling, generate, generate_text, stop_index


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m phi2_jax.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="HF folder, converted checkpoint or run folder")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompt-file", type=Path, help="one prompt per line (\\n escapes allowed)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.json / folder / .model (default: the model's)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    try:  # refused before the model loads, in the flags' names
        Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    except UserInputError as error:
        name, rest = str(error).split(" ", 1)
        raise UserInputError(f"--{name.replace('_', '-')} {rest}") from None
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty, seed=args.seed)
    prompts = list(args.prompt)
    if args.prompt_file:
        prompts += read_prompt_file(args.prompt_file)
    if not prompts:
        raise UserInputError("no prompt given; pass --prompt TEXT or --prompt-file FILE.")
    if any(not p for p in prompts):
        raise UserInputError("a prompt is empty; expected some text.")
    if args.max_new_tokens < 1:
        raise UserInputError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    if not args.model.exists():
        raise UserInputError(f"--model {args.model} does not exist.")

    from phi2_jax.hf.loading import from_pretrained
    from phi2_jax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer or default_tokenizer_path(args.model))
    model = from_pretrained(args.model)
    if args.top_k is not None and args.top_k > model.config.vocab_size:
        raise UserInputError(f"--top-k {args.top_k} exceeds the model's vocabulary of "
                             f"{model.config.vocab_size} tokens.")
    if len(prompts) == 1:
        _stream_one(model, tokenizer, prompts[0], args.max_new_tokens, args.stop, sampling)
        return
    for prompt, text in zip(prompts, generate_text(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                                   stop=args.stop, **sampling)):
        print(f"{'=' * 30}\n{prompt}{text}", flush=True)


def read_prompt_file(path: Path) -> list[str]:
    """One prompt per non-blank line, a literal \\n standing for a newline; the file must be UTF-8."""
    if not path.is_file():
        raise UserInputError(f"--prompt-file {path} does not exist.")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserInputError(f"--prompt-file {path} is not UTF-8 text ({error.reason} at byte {error.start}); "
                             f"expected UTF-8.") from None
    return [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]


def _settled(text: str, stop: list[str]) -> str:
    """`text` less what later tokens may still change: a partial character, the beginning of a stop string."""
    text = text.rstrip("\ufffd")
    held = max([n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])] + [0])
    return text[:len(text) - held]


def _stream_one(model, tokenizer, prompt, max_new_tokens, stop, sampling) -> None:
    """Prints the prompt, then `decode_continuation` as it grows, cut at the first stop string.

    Held back until the next token or the end: a trailing U+FFFD (a character whose
    bytes have not all arrived) and a tail that may be the start of a stop string.
    """
    ids = tokenizer.encode(prompt)
    produced: list[int] = []
    state = {"printed": 0, "done": False}
    sys.stdout.write(prompt)

    def show(final: bool) -> None:
        text = tokenizer.decode_continuation(ids, produced)
        cut = stop_index(text, stop)
        stable = text[:cut] if cut < len(text) or final else _settled(text, stop)
        sys.stdout.write(stable[state["printed"]:])
        sys.stdout.flush()
        state["printed"] = max(state["printed"], len(stable))
        state["done"] = cut < len(text)

    def on_token(step, tokens):
        if state["done"]:
            return
        if tokens[0] == tokenizer.eos_id:
            show(final=True)
            state["done"] = True
            return
        produced.append(int(tokens[0]))
        show(final=False)

    stop_ids = [tokenizer.encode(s) for s in stop if s]
    generate(model, np.asarray([ids]), max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_id,
             stop_sequences=stop_ids, on_token=on_token, **sampling)
    if not state["done"]:
        show(final=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
