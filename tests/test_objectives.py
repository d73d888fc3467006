"""SFT and DPO against TRL's own trainers on the same tiny PhiForCausalLM weights (float32).

TRL's paths used: SFTTrainer.compute_loss on batches from its own collator (completion-only loss,
`num_items_in_batch` = the accumulated batch's counted tokens, as transformers' Trainer passes it), and
DPOTrainer.compute_loss on batches from its collator, with the base model as `ref_model`; gradients by
backward through that loss.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import phi2_jax
from phi2_jax.data.chat import load_chat_template
from phi2_jax.data.formats import Formatter
from phi2_jax.data.post_batches import pack_examples, preference_rows
from phi2_jax.data.tokenizer import HFTokenizer
from phi2_jax.hf.convert import save_pretrained
from phi2_jax.hf.layout import flatten, to_params, unflatten
from phi2_jax.training import objectives
from tests import hf_reference

trl = pytest.importorskip("trl")
torch = pytest.importorskip("torch")
from datasets import Dataset  # noqa: E402  (installed with trl)
from transformers import AutoTokenizer, PhiForCausalLM  # noqa: E402

CFG = dict(dialect="5.x", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, partial_rotary_factor=0.5, max_position_embeddings=128)
ALL = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")
TEXTS = ["what is two plus two? four. hello world, the answer is five or six. " * 8]
SFT_RECORDS = [{"prompt": "what is two plus two?", "completion": " four."},
               {"prompt": "hello", "completion": " world, the answer is five"},
               {"prompt": "the answer is", "completion": " six."},
               {"prompt": "what is the answer? hello world,", "completion": " two"}]
DPO_RECORDS = [{"prompt": "what is two plus two?", "chosen": " four.", "rejected": " five or six."},
               {"prompt": "hello", "chosen": " world", "rejected": " the answer"},
               {"prompt": "the answer is", "chosen": " six. hello", "rejected": " two"}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("post")
    folder, base = hf_reference.write_hf_folder(root / "model", **CFG)
    hf_reference.train_bpe_tokenizer(TEXTS, 300, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    return root, folder, base, AutoTokenizer.from_pretrained(folder)


def formatter(folder, **kwargs):
    return Formatter(HFTokenizer(folder), load_chat_template(folder), 32, **kwargs)


def trl_args(cls, root, **kwargs):
    return cls(output_dir=str(root / "trl"), report_to="none", use_cpu=True, bf16=False, max_length=None, **kwargs)


# ----------------------------------------------------------------------------- SFT
def sft_sums(model, batch):
    return objectives.sft_loss_sums(model, {k: jnp.asarray(v) for k, v in batch.items()})


def test_sft_loss_equals_trl_completion_only_over_accumulated_batch(setup):
    root, folder, base, tokenizer = setup
    examples = [formatter(folder).sft_example(r) for r in SFT_RECORDS]
    trainer = trl.SFTTrainer(model=base, args=trl_args(trl.SFTConfig, root, completion_only_loss=True),
                             processing_class=tokenizer, train_dataset=Dataset.from_dict(
                                 {"input_ids": [e.ids.tolist() for e in examples],
                                  "completion_mask": [e.weights.astype(int).tolist() for e in examples]}))
    rows = [trainer.train_dataset[i] for i in range(len(examples))]  # with the "labels" TRL built from the mask
    assert [r["input_ids"] for r in rows] == [e.ids.tolist() for e in examples]
    micro = [examples[:2], examples[2:]]  # two micro-batches of one accumulated batch, unequal token counts
    counted = sum(int(e.weights[1:].sum()) for e in examples)
    with torch.no_grad():
        theirs = sum(trainer.compute_loss(base, trainer.data_collator(m), num_items_in_batch=counted).item()
                     for m in (rows[:2], rows[2:]))
    model = phi2_jax.from_pretrained(folder)
    sums = [sft_sums(model, pack_examples(m, 32, 0)) for m in micro]
    ours = sum(float(s) for s, _ in sums) / sum(float(c) for _, c in sums)
    assert sum(float(c) for _, c in sums) == counted
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    # Not a mean of per-micro-batch means, which differs here.
    assert abs(np.mean([float(s) / float(c) for s, c in sums]) - ours) > 1e-4


def test_sft_masking_and_packing(setup):
    root, folder, base, tokenizer = setup
    model = phi2_jax.from_pretrained(folder)
    examples = [formatter(folder).sft_example(r) for r in SFT_RECORDS]
    packed = pack_examples(examples, 32, 0)
    assert len(packed["input_ids"]) < len(examples)  # several examples share a row
    total, count = sft_sums(model, packed)
    one_by_one = [sft_sums(model, pack_examples([e], 32, 0)) for e in examples]
    np.testing.assert_allclose(float(total), sum(float(s) for s, _ in one_by_one), rtol=1e-5)
    assert float(count) == sum(float(c) for _, c in one_by_one)
    # Changing a prompt token's target: SFT loss unchanged, LM loss (every token counted) changed.
    changed = dict(packed, targets=packed["targets"].copy())
    prompt_position = int(np.argmax((packed["weights"][0] == 0) & (packed["segment_ids"][0] == 1)))
    changed["targets"][0, prompt_position] = (changed["targets"][0, prompt_position] + 1) % 512
    assert float(sft_sums(model, changed)[0]) == float(total)
    lm = lambda b: sft_sums(model, dict(b, weights=(b["segment_ids"] > 0).astype(np.float32)))[0]  # noqa: E731
    assert abs(float(lm(changed)) - float(lm(packed))) > 1e-3
    everything = formatter(folder, count_prompt=True)
    all_tokens = pack_examples([everything.sft_example(r) for r in SFT_RECORDS], 32, 0)
    assert float(all_tokens["weights"].sum()) == sum(len(e.ids) - 1 for e in examples)


# ----------------------------------------------------------------------------- DPO
def with_random_b(model, scale=0.05):
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    flat = {k: (rng.normal(0, scale, v.shape).astype(np.float32) if k.endswith("lora_b") else v)
            for k, v in flatten(nnx.to_pure_dict(state)).items()}
    return nnx.merge(graphdef, unflatten(flat))


@pytest.fixture(scope="module")
def dpo(setup):
    """(our LoRA policy, TRL trainer with the merged policy and the base as reference, TRL's batch, our rows)."""
    root, folder, base, tokenizer = setup
    adapted = with_random_b(phi2_jax.from_pretrained(folder, lora_rank=4, lora_alpha=8.0, lora_targets=ALL))
    save_pretrained(adapted, root / "policy")
    policy = PhiForCausalLM.from_pretrained(root / "policy").eval()
    trainer = trl.DPOTrainer(model=policy, ref_model=base, args=trl_args(trl.DPOConfig, root),
                             processing_class=tokenizer, train_dataset=Dataset.from_list(DPO_RECORDS))
    rows = [trainer.train_dataset[i] for i in range(len(DPO_RECORDS))]
    pairs = [formatter(folder).preference_pair(r) for r in DPO_RECORDS]
    for row, pair in zip(rows, pairs):  # the same tokens on both sides
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == (
            pair.prompt.tolist(), pair.chosen.tolist(), pair.rejected.tolist())
    batch = {k: jnp.asarray(v) for k, v in preference_rows(pairs, 32, 0).items()}
    return adapted, policy, trainer, trainer.data_collator(rows), batch, folder


def torch_grads_in_our_layout(policy, config, shapes):
    grads = {name: p.grad.detach().numpy() for name, p in policy.named_parameters()}
    return to_params(config, "transformers", lambda name: grads[name], shapes, np.float32)


@pytest.mark.parametrize("loss_type,beta,smoothing", [("sigmoid", 0.1, 0.0), ("ipo", 0.5, 0.0), ("hinge", 2.0, 0.0),
                                                      ("robust", 0.3, 0.2)])
def test_dpo_equals_trl(dpo, loss_type, beta, smoothing):
    adapted, policy, trainer, trl_batch, batch, folder = dpo
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    trainer.beta, trainer.label_smoothing = beta, smoothing
    policy.zero_grad()
    theirs = trainer.compute_loss(policy, dict(trl_batch))
    theirs.backward()
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

    graphdef, state = nnx.split(adapted)
    params = nnx.to_pure_dict(state)
    trainable = {k: v for k, v in flatten(params).items() if k.endswith(("lora_a", "lora_b"))}
    frozen = {k: v for k, v in flatten(params).items() if k not in trainable}

    def loss(trainable):
        total, count, metrics = objectives.dpo_loss_sums(graphdef, unflatten({**frozen, **trainable}), batch,
                                                         beta=beta, loss_type=loss_type, label_smoothing=smoothing)
        return total / count, jax.tree.map(lambda m: m / count, metrics)

    (ours, metrics), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
    np.testing.assert_allclose(float(ours), theirs.item(), rtol=1e-5)
    for key in ("logps/chosen", "logps/rejected", "rewards/accuracies"):
        np.testing.assert_allclose(float(metrics[key]), logged[key], rtol=1e-5, err_msg=key)
    # Rewards are beta * (a difference of two log-probs of ~|logps|): float32 knows them to 1e-5 of beta |logps|.
    reward_tolerance = 1e-5 * beta * max(abs(logged["logps/chosen"]), abs(logged["logps/rejected"]))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        np.testing.assert_allclose(float(metrics[key]), logged[key], rtol=1e-5, atol=reward_tolerance, err_msg=key)

    # Gradients: TRL's are with respect to the merged weights W = W0 + s A B; the chain rule gives the adapters'.
    base_config = adapted.config.replace(lora_rank=0)
    shapes = {k: v.shape for k, v in frozen.items()}
    merged_grads = torch_grads_in_our_layout(policy, base_config, shapes)
    scale = adapted.config.lora_alpha / adapted.config.lora_rank
    for path, g in grads.items():
        prefix = path.rsplit("/", 1)[0]
        a, b = np.asarray(trainable[prefix + "/lora_a"]), np.asarray(trainable[prefix + "/lora_b"])
        w_grad = merged_grads[prefix + "/kernel"]
        expected = scale * (w_grad @ np.swapaxes(b, -1, -2) if path.endswith("lora_a") else np.swapaxes(a, -1, -2) @ w_grad)
        np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max(), err_msg=path)

    # Full fine-tuning: every weight's gradient, the reference given as precomputed log-probs.
    plain = phi2_jax.from_pretrained(folder)  # the base: reference
    ref_chosen, ref_rejected = objectives.pair_logps(plain, batch)
    full = phi2_jax.from_pretrained(save_dir(folder))
    full_graphdef, full_state = nnx.split(full)

    def full_loss(params):
        total, count, _ = objectives.dpo_loss_sums(full_graphdef, params, dict(batch, ref_chosen_logps=ref_chosen,
                                                   ref_rejected_logps=ref_rejected), beta=beta, loss_type=loss_type,
                                                   label_smoothing=smoothing)
        return total / count

    value, full_grads = jax.value_and_grad(full_loss)(nnx.to_pure_dict(full_state))
    np.testing.assert_allclose(float(value), theirs.item(), rtol=1e-5)
    for path, g in flatten(full_grads).items():
        expected = merged_grads[path]
        np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max(), err_msg=path)


def save_dir(folder):
    return folder.parent / "policy"


def test_lora_reference_is_the_base_without_a_second_copy(dpo):
    adapted, policy, trainer, trl_batch, batch, folder = dpo
    graphdef, state = nnx.split(adapted)
    params = nnx.to_pure_dict(state)
    ref_chosen, ref_rejected = objectives.reference_logps(graphdef, params, batch)
    base_chosen, base_rejected = objectives.pair_logps(phi2_jax.from_pretrained(folder), batch)
    np.testing.assert_allclose(np.asarray(ref_chosen), np.asarray(base_chosen), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ref_rejected), np.asarray(base_rejected), rtol=1e-6)
    policy_chosen, _ = objectives.pair_logps(adapted, batch)
    assert np.abs(np.asarray(policy_chosen) - np.asarray(base_chosen)).max() > 1e-3  # the adapters matter
    # No second copy: every base weight of the reference tree IS the policy's array; only zero lora_b are new.
    off = flatten(objectives.adapters_off(params))
    flat = flatten(params)
    new_bytes = sum(v.nbytes for k, v in off.items() if v is not flat[k])
    assert all(off[k] is flat[k] for k in flat if not k.endswith("lora_b"))
    assert new_bytes == sum(v.nbytes for k, v in flat.items() if k.endswith("lora_b"))
    assert new_bytes < 0.05 * sum(v.nbytes for v in flat.values())


def test_dpo_options_are_checked(dpo):
    from phi2_jax.errors import ConfigError

    *_, batch, folder = dpo
    graphdef, state = nnx.split(phi2_jax.from_pretrained(folder))  # no adapters and no reference log-probs given
    with pytest.raises(ConfigError, match="train.objective dpo needs a reference: set model.lora_rank > 0"):
        objectives.dpo_loss_sums(graphdef, nnx.to_pure_dict(state), batch, beta=0.1)

    for args, message in [(("sigmoids", 0.1, 0.0), "dpo.loss_type is 'sigmoids'"), (("sigmoid", 0.0, 0.0), "dpo.beta"),
                          (("robust", 0.1, 0.5), "dpo.label_smoothing is 0.5"),
                          (("sigmoid", 0.1, 0.1), "ignores it")]:
        with pytest.raises(ConfigError, match=message):
            objectives.check_dpo_options(*args)
