"""The TRL side of `python -m phi2_jax.bench sft|dpo --compare trl`, in a process of its own.

Run as a script (`python .../trl_worker.py MODEL_DIR DTYPE`), for the reason
torch_worker.py gives: no jax in this process, each framework alone.

One repetition is what transformers' Trainer does per optimizer step at
gradient accumulation 1 (its `_inner_training_loop`): `trainer.training_step`
(TRL's compute_loss, backward), `_clip_grad_norm` (max_grad_norm 1.0), the
optimizer's step (the Trainer's own AdamW: `create_optimizer`, weight decay off
for biases and LayerNorms), `model.zero_grad()`. Left out: the data loader,
the learning-rate scheduler's step and logging, which ours has no counterpart
of in its timed step either. The batch is collated once by the trainer's own
collator, from the trainer's own dataset.

    sft  SFTTrainer, completion_only_loss, on the examples' token ids and
         completion masks (no packing: the bench's examples each fill a row).
    dpo  DPOTrainer, loss_type sigmoid, beta 0.1, full fine-tuning with
         precompute_ref_log_probs=True (the reference log-probs computed once
         by the initial model in the trainer's constructor and read from the
         batch, as ours reads them). TRL's DPO tokenizes text, so the pairs come
         as words of a word-level vocabulary in which "t{i}" is token i; the
         worker checks that TRL's tokens are the bench's.

Protocol: one JSON object per line on stdin, one answer per line on stdout.
    {"op": "setup", "suite": "sft"|"dpo", "examples": "file.json", "batch": B, "work_dir": DIR,
     "checkpointing": bool (gradient checkpointing, on where ours rematerialises)}
                            -> {"device": "cuda"|"cpu"}
    {"op": "run"}           one optimizer step -> {"loss": float, "grad_norm": float, ...metrics}
    {"op": "peak_memory"}   -> {"peak_rss_mb": float, "peak_device_mb": float | null}
"""

from __future__ import annotations

import json
import os
import resource
import sys

import torch


def word_tokenizer(vocab_size: int):
    """A tokenizer in which the word "t{i}" is token i and spaces separate words (t0 is EOS and padding)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words, eos_token="t0", pad_token="t0")


def text(ids: list[int]) -> str:
    return "".join(f" t{i}" for i in ids)


def make_trainer(model, suite: str, examples: list[dict], batch: int, work_dir: str, compute_dtype: torch.dtype,
                 checkpointing: bool):
    import trl
    from datasets import Dataset

    common = dict(output_dir=os.path.join(work_dir, "trl"), report_to="none", use_cpu=not torch.cuda.is_available(),
                  bf16=compute_dtype == torch.bfloat16, max_length=None, per_device_train_batch_size=batch,
                  learning_rate=1e-4, weight_decay=0.1, max_grad_norm=1.0, gradient_accumulation_steps=1,
                  gradient_checkpointing=checkpointing)  # TRL's default is True; ours follows --remat
    tokenizer = word_tokenizer(model.config.vocab_size)
    if suite == "sft":
        data = Dataset.from_dict({"input_ids": [e["ids"] for e in examples],
                                  "completion_mask": [e["completion_mask"] for e in examples]})
        trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(completion_only_loss=True, **common),
                                 processing_class=tokenizer, train_dataset=data)
        rows = [trainer.train_dataset[i] for i in range(batch)]
        assert [r["input_ids"] for r in rows] == [e["ids"] for e in examples[:batch]], "TRL changed the token ids"
        return trainer, trainer.data_collator(rows)
    # The prompt text ends where its last word does: the responses start with a space, as TRL concatenates them.
    data = Dataset.from_list([{"prompt": text(e["prompt"]).lstrip(), "chosen": text(e["chosen"]),
                               "rejected": text(e["rejected"])} for e in examples])
    trainer = trl.DPOTrainer(model=model, args=trl.DPOConfig(loss_type=["sigmoid"], beta=0.1,
                                                             precompute_ref_log_probs=True, **common),
                             processing_class=tokenizer, train_dataset=data)
    rows = [trainer.train_dataset[i] for i in range(batch)]
    for row, e in zip(rows, examples):
        tokens = (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])
        assert tokens == (e["prompt"], e["chosen"], e["rejected"]), "TRL's tokens differ from the bench's"
    return trainer, trainer.data_collator(rows)


def make_step(trainer, inputs: dict, suite: str):
    """One optimizer step as the Trainer's loop takes it; returns its loss, gradient norm and TRL's logged metrics."""
    model = trainer.model
    trainer.optimizer = trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    # What Trainer.get_batch_samples passes: the batch's counted (shifted) labels. DPO ignores it.
    counted = (inputs["labels"][..., 1:] != -100).sum() if "labels" in inputs else None

    def step() -> dict:
        loss = trainer.training_step(model, dict(inputs), counted)
        grad_norm = trainer._clip_grad_norm(model)
        trainer.optimizer.step()
        model.zero_grad()
        answer = {"loss": loss.item(), "grad_norm": float(grad_norm)}
        if suite == "dpo":
            answer.update({k: trainer._metrics["train"][k][-1] for k in ("logps/chosen", "logps/rejected")})
        return answer

    return step


def main() -> None:
    answers, sys.stdout = sys.stdout, sys.stderr  # anything a library prints must not break the protocol
    model_dir, compute_dtype = sys.argv[1], getattr(torch, sys.argv[2])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step = None
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "setup":
            os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(request["work_dir"], "datasets"))
            from transformers import PhiForCausalLM

            model = PhiForCausalLM.from_pretrained(model_dir, dtype="auto").to(device)  # trained as stored
            with open(request["examples"]) as f:
                examples = json.load(f)
            trainer, inputs = make_trainer(model, request["suite"], examples, request["batch"], request["work_dir"],
                                           compute_dtype, request["checkpointing"])
            step = make_step(trainer, inputs, request["suite"])
            answer = {"device": device.type}
        elif request["op"] == "run":
            answer = step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        else:
            device_peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
            answer = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "peak_device_mb": device_peak}
        print(json.dumps(answer), file=answers, flush=True)


if __name__ == "__main__":
    main()
