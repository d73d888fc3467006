"""EleutherAI lm-evaluation-harness support: its task catalogue on our model.

    python -m phi2_jax.lm_eval_adapter --model PATH --tasks piqa,arc_easy,hellaswag [--num-fewshot 0]

or from Python: `lm_eval.simple_evaluate(model=phi2_jax.evaluation.lm_eval_adapter.lm_eval_model(PATH), tasks=[...])`.
`Harness` implements the three request types on plain tuples (usable without
lm_eval installed); `lm_eval_model` wraps it in lm_eval's `LM` class and
registers it as model type "phi2_jax". The tests run a local lm_eval task
through it and hold its scores to transformers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from phi2_jax.errors import UserInputError, exit_on_user_error
from phi2_jax.inference.scoring import loglikelihood, rolling_loglikelihood


class Harness:
    """loglikelihood / loglikelihood_rolling / generate_until over (str, ...) argument tuples."""

    def __init__(self, model, tokenizer, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        encoded = []
        for context, continuation in requests:
            # Move trailing spaces of the context onto the continuation, as lm-eval's HF model does,
            # so the tokenizer sees " word" and not " " + "word".
            stripped = context.rstrip(" ")
            continuation = context[len(stripped):] + continuation
            encoded.append((self.tokenizer.encode(stripped) if stripped else [], self.tokenizer.encode(continuation)))
        return loglikelihood(self.model, encoded, eos_id=self.tokenizer.eos_id, batch_size=self.batch_size)

    def loglikelihood_rolling(self, requests: list[tuple[str]]) -> list[float]:
        return [rolling_loglikelihood(self.model, self.tokenizer.encode(text), eos_id=self.tokenizer.eos_id,
                                      batch_size=self.batch_size) for (text,) in requests]

    def generate_until(self, requests: list[tuple[str, dict]]) -> list[str]:
        from phi2_jax.inference.generate import generate_text

        outputs = [""] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for n, (_, kwargs) in enumerate(requests):
            until = kwargs.get("until", [])
            until = (until,) if isinstance(until, str) else tuple(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            groups.setdefault((until, int(kwargs.get("max_gen_toks", 256)), temperature), []).append(n)
        # Requests with the same settings are generated batch_size at a time (left-padded by generate_text).
        for (until, max_new_tokens, temperature), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                texts = generate_text(self.model, self.tokenizer, [requests[n][0] for n in chunk],
                                      max_new_tokens=max_new_tokens, stop=until, temperature=temperature)
                for n, text in zip(chunk, texts):
                    outputs[n] = text
        return outputs


def lm_eval_model(pretrained: str, tokenizer: str | None = None, batch_size: int = 8):
    """An lm_eval `LM` for a model path (HF folder, converted checkpoint or run folder)."""
    try:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError:
        raise UserInputError("lm-evaluation-harness is not installed; pip install 'phi2_jax[lm_eval]'.") from None

    from phi2_jax.hf.loading import default_tokenizer_path
    from phi2_jax.hf.loading import from_pretrained
    from phi2_jax.data.tokenizer import load_tokenizer

    @register_model("phi2_jax")
    class Phi2JaxLM(LM):
        def __init__(self, pretrained: str, tokenizer: str | None = None, batch_size: int | str = 8, **_):
            super().__init__()
            path = Path(pretrained)
            tok = load_tokenizer(Path(tokenizer) if tokenizer else default_tokenizer_path(path))
            self.harness = Harness(from_pretrained(path), tok, int(batch_size))

        def loglikelihood(self, requests):
            return self.harness.loglikelihood([r.args for r in requests])

        def loglikelihood_rolling(self, requests):
            return self.harness.loglikelihood_rolling([r.args for r in requests])

        def generate_until(self, requests):
            return self.harness.generate_until([r.args for r in requests])

    return Phi2JaxLM(pretrained, tokenizer, batch_size)


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m phi2_jax.lm_eval_adapter", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer")
    parser.add_argument("--tasks", required=True, help="comma-separated lm_eval task names")
    parser.add_argument("--num-fewshot", type=int)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    model = lm_eval_model(args.model, args.tokenizer, args.batch_size)
    import lm_eval

    results = lm_eval.simple_evaluate(model=model, tasks=args.tasks.split(","), num_fewshot=args.num_fewshot,
                                      limit=args.limit)
    print(json.dumps(results["results"], indent=2, default=str))
    if args.output:
        args.output.write_text(json.dumps(results["results"], indent=2, default=str))


if __name__ == "__main__":
    main()
