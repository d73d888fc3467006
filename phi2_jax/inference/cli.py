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
from phi2_jax.inference.generate import generate, generate_text


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

    from phi2_jax.hf.loading import from_pretrained
    from phi2_jax.data.tokenizer import load_tokenizer

    prompts = list(args.prompt)
    if args.prompt_file:
        if not args.prompt_file.is_file():
            raise UserInputError(f"--prompt-file {args.prompt_file} does not exist.")
        prompts += [line.replace("\\n", "\n") for line in args.prompt_file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserInputError("no prompt given; pass --prompt TEXT or --prompt-file FILE.")
    if any(not p for p in prompts):
        raise UserInputError("a prompt is empty; expected some text.")
    if not args.model.exists():
        raise UserInputError(f"--model {args.model} does not exist.")
    tokenizer = load_tokenizer(args.tokenizer or default_tokenizer_path(args.model))
    model = from_pretrained(args.model)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty, seed=args.seed)
    if len(prompts) == 1:
        _stream_one(model, tokenizer, prompts[0], args.max_new_tokens, args.stop, sampling)
        return
    for prompt, text in zip(prompts, generate_text(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                                   stop=args.stop, **sampling)):
        print(f"{'=' * 30}\n{prompt}{text}", flush=True)


def _stream_one(model, tokenizer, prompt, max_new_tokens, stop, sampling) -> None:
    """Prints the continuation as it is produced (decoding the growing sequence keeps multi-byte tokens whole)."""
    ids = tokenizer.encode(prompt)
    produced: list[int] = []
    printed = [""]
    sys.stdout.write(prompt)

    def on_token(step, tokens):
        if tokens[0] == tokenizer.eos_id or printed[0] is None:
            printed[0] = None
            return
        produced.append(int(tokens[0]))
        text = tokenizer.decode(produced)
        cut = min([text.find(s) for s in stop if s and s in text] + [len(text)])
        sys.stdout.write(text[len(printed[0]):cut])
        sys.stdout.flush()
        printed[0] = None if cut < len(text) else text

    stop_ids = [tokenizer.encode(s) for s in stop if s]
    generate(model, np.asarray([ids]), max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_id,
             stop_sequences=stop_ids, on_token=on_token, **sampling)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
