"""The TRL side of `python -m phi2_jax.bench sft|dpo|grpo --compare trl`, in a process of its own.

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
    grpo GRPOTrainer (use_vllm False, beta 0, loss_type grpo, num_iterations 1,
         temperature 1.0, G = num_generations), the prompts as words as for dpo.
         A step is what the Trainer's loop does with one batch from GRPO's
         dataloader (each prompt repeated G times): training_step, whose
         _prepare_inputs generates (transformers' `generate` with the
         GenerationConfig TRL builds, plus min_new_tokens = max_completion_length
         so that no completion ends early), scores with the reward function and
         computes the advantages, then compute_loss and backward; then clipping,
         the optimizer's step and zero_grad as above. The reward is the
         completion's index in its group (0 .. G-1): no reward cost, and
         advantages that are not all zero.

Protocol: one JSON object per line on stdin, one answer per line on stdout.
    {"op": "setup", "suite": "sft"|"dpo"|"grpo", "examples": "file.json", "batch": B, "work_dir": DIR,
     "checkpointing": bool (gradient checkpointing, on where ours rematerialises)}
                            -> {"device": "cuda"|"cpu"}
                            (grpo's examples: {"prompts": [[ids]], "generations": G, "new_tokens": T})
    {"op": "run"}           one optimizer step -> {"loss": float, "grad_norm": float, ...metrics}
    grpo only:
    {"op": "rollout"}       G completions of each prompt, as GRPOTrainer._generate_single_turn samples them
                            -> {"new_tokens": int}
    {"op": "check", "prompts": [[ids]], "completions": [[ids]], "advantages": [float]}
                            TRL's _compute_loss and backward on given rollouts, no update
                            -> {"loss", "grad_norm", "entropy"}
    {"op": "peak_memory"}   -> {"peak_rss_mb": float, "peak_device_mb": float | null}
"""

from __future__ import annotations

import json
import os
import sys

import torch
from worker_loop import serve  # this script's folder (see worker_loop.py)


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
                  bf16=compute_dtype == torch.bfloat16, per_device_train_batch_size=batch,
                  learning_rate=1e-4, weight_decay=0.1, max_grad_norm=1.0, gradient_accumulation_steps=1,
                  gradient_checkpointing=checkpointing)  # TRL's default is True; ours follows --remat
    tokenizer = word_tokenizer(model.config.vocab_size)
    if suite == "grpo":
        return grpo_trainer(model, examples, common, tokenizer)
    common["max_length"] = None
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


def grpo_trainer(model, examples: dict, common: dict, tokenizer):
    """(GRPOTrainer, one batch as its dataloader yields it: each prompt's row G times in a row)."""
    import trl
    from datasets import Dataset

    g, new_tokens = examples["generations"], examples["new_tokens"]
    prompts = [text(p).lstrip() for p in examples["prompts"]]
    common["per_device_train_batch_size"] = g * len(prompts)  # TRL's batch counts completions

    def group_index(completions, **_):  # the completions come in groups of G (the dataloader's order)
        return [float(i % g) for i in range(len(completions))]

    config = trl.GRPOConfig(num_generations=g, max_completion_length=new_tokens, temperature=1.0, beta=0.0,
                            loss_type="grpo", num_iterations=1, use_vllm=False, epsilon=0.2, scale_rewards="group",
                            generation_kwargs={"min_new_tokens": new_tokens}, **common)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=group_index, args=config, processing_class=tokenizer,
                              train_dataset=Dataset.from_dict({"prompt": prompts}))
    rows = [trainer.train_dataset[i] for i in range(len(prompts)) for _ in range(g)]
    ids, _, _ = trainer._tokenize_prompts([r["prompt"] for r in rows])
    assert ids == [p for p in examples["prompts"] for _ in range(g)], "TRL's prompt tokens differ from the bench's"
    trainer.grpo_prompt_ids = ids
    return trainer, rows


def grpo_rollout(trainer) -> dict:
    """One generation batch as training_step's _generate takes it, after the prompts' tokenization."""
    trainer.model.train()  # as in training: unwrap_model_for_generation turns gradient checkpointing off meanwhile
    completions, _ = trainer._generate_single_turn(trainer.grpo_prompt_ids, None, {}, trainer.num_generations)
    return {"new_tokens": sum(len(c) for c in completions)}


def grpo_check(trainer, request: dict) -> dict:
    """TRL's loss, gradient norm and entropy on the given rollouts (built as _generate_and_score_completions
    builds its inputs; on-policy: no old log-probs), the gradient dropped afterwards."""
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = {"prompt_ids": torch.tensor(request["prompts"]), "completion_ids": torch.tensor(request["completions"]),
              "advantages": torch.tensor(request["advantages"], dtype=torch.float32)}
    inputs["prompt_mask"] = torch.ones_like(inputs["prompt_ids"])
    inputs["completion_mask"] = torch.ones_like(inputs["completion_ids"])
    device = next(model.parameters()).device
    loss = trainer._compute_loss(model, {k: v.to(device) for k, v in inputs.items()})
    loss.backward()
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    model.zero_grad()
    return {"loss": loss.item(), "grad_norm": float(grad_norm), "entropy": trainer._metrics["train"]["entropy"][-1]}


def make_step(trainer, inputs, suite: str):
    """One optimizer step as the Trainer's loop takes it; returns its loss, gradient norm and TRL's logged metrics."""
    model = trainer.model
    trainer.optimizer = trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    # What Trainer.get_batch_samples passes: the batch's counted (shifted) labels. DPO and GRPO ignore it.
    counted = (inputs["labels"][..., 1:] != -100).sum() if suite == "sft" else None

    def step() -> dict:
        batch = [dict(row) for row in inputs] if suite == "grpo" else dict(inputs)
        loss = trainer.training_step(model, batch, counted)
        grad_norm = trainer._clip_grad_norm(model)
        trainer.optimizer.step()
        model.zero_grad()
        answer = {"loss": loss.item(), "grad_norm": float(grad_norm)}
        if suite == "dpo":
            answer.update({k: trainer._metrics["train"][k][-1] for k in ("logps/chosen", "logps/rejected")})
        if suite == "grpo":
            answer["new_tokens"] = round(trainer._metrics["train"]["completions/mean_length"][-1] * len(inputs))
        return answer

    return step


def main() -> None:
    model_dir, compute_dtype = sys.argv[1], getattr(torch, sys.argv[2])
    trainer = step = None

    def handle(request: dict, device: torch.device) -> dict:
        nonlocal trainer, step
        if request["op"] == "setup":
            os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(request["work_dir"], "datasets"))
            from transformers import PhiForCausalLM

            model = PhiForCausalLM.from_pretrained(model_dir, dtype="auto").to(device)  # trained as stored
            with open(request["examples"]) as f:
                examples = json.load(f)
            trainer, inputs = make_trainer(model, request["suite"], examples, request["batch"], request["work_dir"],
                                           compute_dtype, request["checkpointing"])
            step = make_step(trainer, inputs, request["suite"])
            return {"device": device.type}
        if request["op"] == "check":
            return grpo_check(trainer, request)
        return step() if request["op"] == "run" else grpo_rollout(trainer)

    serve(handle)

if __name__ == "__main__":
    main()
