"""GRPO's numbers against TRL 1.16's GRPOTrainer on the same tiny PhiForCausalLM weights (float32).

TRL's path used: a real GRPOTrainer (use_vllm False, CPU, a dummy reward function: it is never called)
whose `_compute_loss(model, inputs)` is called directly on inputs built as its `_generate_and_score_completions`
builds them (left-padded prompt_ids/prompt_mask, right-padded completion_ids/completion_mask, advantages,
old_per_token_logps, ref_per_token_logps), with the model in eval mode (no dropout, and TRL then divides by
no accumulation steps); its sampling temperature 0.7 is applied by its fused LM head, as ours is. The
gradient is torch's backward through that loss, compared with ours for every weight.
"""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import phi2_jax
from phi2_jax.errors import ConfigError
from phi2_jax.hf.layout import flatten, to_params, unflatten
from phi2_jax.training import grpo
from tests import hf_reference

trl = pytest.importorskip("trl")
torch = pytest.importorskip("torch")
from datasets import Dataset  # noqa: E402  (installed with trl)
from transformers import AutoTokenizer  # noqa: E402

VOCAB = 300
CFG = dict(dialect="5.x", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, partial_rotary_factor=0.5, max_position_embeddings=128)
TEMPERATURE = 0.7
MAX_COMPLETION = 6
EOS, PAD = 0, 1
# Prompts of different lengths (left padding) and completions: ended by EOS early, by EOS at the limit, truncated.
PROMPTS = [[5, 17, 42, 99], [23, 8], [7, 7, 7], [250, 3, 11, 12, 13]]
COMPLETIONS = [[31, 32, EOS], [40, 41, 42, 43, 44, EOS], [60, 61, 62, 63, 64, 65], [70, EOS]]
ADVANTAGES = np.array([1.2, -0.7, 0.9, -1.5], np.float32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    folder, base = hf_reference.write_hf_folder(root / "model", **CFG)
    hf_reference.train_bpe_tokenizer(["what is two plus two? four. hello world"] * 8, VOCAB, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    args = trl.GRPOConfig(output_dir=str(root / "trl"), report_to="none", use_cpu=True, bf16=False,
                          num_generations=2, per_device_train_batch_size=4, max_completion_length=MAX_COMPLETION,
                          temperature=TEMPERATURE, epsilon=0.2, epsilon_high=0.28)
    trainer = trl.GRPOTrainer(model=base, reward_funcs=lambda prompts, completions, **_: [0.0] * len(completions),
                              args=args, train_dataset=Dataset.from_dict({"prompt": ["hello", "two"]}),
                              processing_class=AutoTokenizer.from_pretrained(folder))
    trainer.model.eval()
    return folder, trainer


def trl_inputs(old, ref):
    """TRL's inputs for PROMPTS / COMPLETIONS: prompts left-padded, completions right-padded with their mask."""
    width = max(map(len, PROMPTS))
    prompt_ids = torch.tensor([[PAD] * (width - len(p)) + p for p in PROMPTS])
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    completion_ids = torch.tensor([c + [PAD] * (MAX_COMPLETION - len(c)) for c in COMPLETIONS])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (MAX_COMPLETION - len(c)) for c in COMPLETIONS])
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": torch.tensor(ADVANTAGES),
            "old_per_token_logps": torch.tensor(old), "ref_per_token_logps": torch.tensor(ref)}


def to_ours(per_completion, width):
    """[B, C] per completion token -> [B, T] at the columns whose target is that token."""
    out = np.zeros((len(PROMPTS), width), np.float32)
    start = max(map(len, PROMPTS)) - 1
    out[:, start:start + MAX_COMPLETION] = per_completion
    return out


def our_batch(length=12):
    batch = grpo.rollout_batch(PROMPTS, COMPLETIONS, EOS, PAD, length)
    batch.pop("truncated")
    return {**batch, "advantages": ADVANTAGES}


@pytest.fixture(scope="module")
def logps(setup):
    """TRL's current per-token log-probs [B, C] and old / ref ones drawn around them (so that ratios are clipped)."""
    folder, trainer = setup
    inputs = trl_inputs(np.zeros((4, MAX_COMPLETION), np.float32), np.zeros((4, MAX_COMPLETION), np.float32))
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        current, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, MAX_COMPLETION)
    rng = np.random.default_rng(0)
    current = current.numpy()
    old = (current + rng.normal(0, 0.4, current.shape)).astype(np.float32)
    ref = (current + rng.normal(0, 0.3, current.shape)).astype(np.float32)
    return current, old, ref


CASES = [*[(loss_type, beta, True) for loss_type in grpo.LOSS_TYPES for beta in (0.0, 0.05)], ("grpo", 0.05, False)]


@pytest.fixture(scope="module")
def ours(setup, logps):
    """Our (loss, metric sums) and gradients for every case of CASES, plus the on-policy bnpo loss (no old_logps),
    from ONE jitted program (compiling each case apart costs ~10 s a case on a loaded 2-core machine)."""
    folder, _ = setup
    current, old, ref = logps
    model = phi2_jax.from_pretrained(folder)
    graphdef, state = nnx.split(model)
    batch = our_batch()
    width = batch["input_ids"].shape[1]
    off_policy = {**batch, "old_logps": to_ours(old, width), "ref_logps": to_ours(ref, width)}

    def loss(params, batch, loss_type, beta, kl_correction):
        total, count, metrics = grpo.grpo_loss_sums(
            graphdef, params, batch, beta=beta, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type,
            max_completion_length=MAX_COMPLETION, temperature=TEMPERATURE, bias_correction_kl=kl_correction)
        return total / count, metrics

    def every_case(params, off_policy, on_policy):
        results = {case: jax.value_and_grad(loss, has_aux=True)(params, off_policy, *case) for case in CASES}
        return results, loss(params, on_policy, "bnpo", 0.0, True)

    return model.config, jax.jit(every_case)(nnx.to_pure_dict(state), off_policy, batch)


@pytest.mark.parametrize("loss_type,beta,kl_correction", CASES)
def test_loss_and_gradient_equal_trls(setup, logps, ours, loss_type, beta, kl_correction):
    folder, trainer = setup
    config, (results, _) = ours
    current, old, ref = logps
    trainer.loss_type, trainer.beta = loss_type, beta
    trainer.args.use_bias_correction_kl = kl_correction
    trainer._metrics["eval"].clear()
    trainer.model.zero_grad()
    theirs = trainer._compute_loss(trainer.model, trl_inputs(old, ref))
    theirs.backward()
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    assert logged["clip_ratio/low_mean"] > 0 and logged["clip_ratio/high_mean"] > 0  # both bounds are hit

    (value, metrics), grads = results[(loss_type, beta, kl_correction)]
    np.testing.assert_allclose(float(value), theirs.item(), rtol=1e-5)
    ours_logged = grpo.grpo_metrics(metrics)
    assert ("kl" in ours_logged) == (beta > 0) == ("kl" in logged)
    for key, metric in ours_logged.items():
        np.testing.assert_allclose(metric, logged[key], rtol=1e-5, err_msg=key)

    torch_grads = {name: p.grad.detach().numpy() for name, p in trainer.model.named_parameters()}
    shapes = {k: v.shape for k, v in flatten(grads).items()}
    expected = to_params(config, "transformers", lambda name: torch_grads[name], shapes, np.float32)
    for path, g in flatten(grads).items():
        e = expected[path]
        np.testing.assert_allclose(np.asarray(g), e, rtol=1e-5, atol=1e-5 * np.abs(e).max(), err_msg=path)


def test_on_policy_without_old_logps_is_a_ratio_of_one(setup, logps, ours):
    """TRL's num_iterations=1 case: no old_per_token_logps, the policy's own detached log-probs instead."""
    folder, trainer = setup
    _, (_, (value, metrics)) = ours
    current, old, ref = logps
    trainer.loss_type, trainer.beta = "bnpo", 0.0
    inputs = trl_inputs(old, ref)
    del inputs["old_per_token_logps"]
    with torch.no_grad():
        theirs = trainer._compute_loss(trainer.model, inputs).item()
    np.testing.assert_allclose(float(value), theirs, rtol=1e-5)
    assert float(metrics["clip_ratio/region_mean"]) == 0.0


def test_left_padded_rows_give_the_same_logps_as_unpadded_ones(setup):
    folder, _ = setup
    model = phi2_jax.from_pretrained(folder)
    together = grpo.rollout_batch(PROMPTS, COMPLETIONS, EOS, PAD, 12)
    assert (together["segment_ids"][:, 0] == 0).any()  # some rows are left-padded
    # The same rows starting at column 0 (no left padding; right padding cannot reach back, attention is causal).
    alone = {k: np.zeros_like(v) for k, v in together.items() if k != "truncated"}
    for r, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        tokens = prompt + completion
        n = len(tokens) - 1
        alone["input_ids"][r, :n], alone["targets"][r, :n] = tokens[:-1], tokens[1:]
        alone["positions"][r, :n], alone["segment_ids"][r, :n] = np.arange(n), 1
        alone["completion_mask"][r, len(prompt) - 1:n] = 1
    padded_logps, _ = grpo.completion_logps(model, together)
    alone_logps, _ = grpo.completion_logps(model, alone)
    for r in range(len(PROMPTS)):
        np.testing.assert_allclose(np.asarray(padded_logps)[r][together["completion_mask"][r] > 0],
                                   np.asarray(alone_logps)[r][alone["completion_mask"][r] > 0], rtol=1e-5)


def test_rollout_batch_layout():
    batch = grpo.rollout_batch([[5, 6], [4]], [[7, EOS, 9], [8, 8]], EOS, PAD, 5, mask_truncated=False)
    np.testing.assert_array_equal(batch["input_ids"], [[5, 6, 7, EOS, PAD], [PAD, 4, 8, 8, PAD]])
    np.testing.assert_array_equal(batch["targets"], [[6, 7, EOS, PAD, PAD], [4, 8, 8, PAD, PAD]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 1, 0], [0, 1, 1, 1, 0]])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 3, 0], [0, 0, 1, 2, 0]])
    # The first completion is cut after its EOS, which counts; the second has no EOS: truncated.
    np.testing.assert_array_equal(batch["completion_mask"], [[0, 1, 1, 0, 0], [0, 1, 1, 0, 0]])
    np.testing.assert_array_equal(batch["truncated"], [False, True])
    masked = grpo.rollout_batch([[5, 6], [4]], [[7, EOS, 9], [8, 8]], EOS, PAD, 5, mask_truncated=True)
    np.testing.assert_array_equal(masked["completion_mask"], [[0, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    with pytest.raises(phi2_jax.UserInputError, match="needs length >= 3, got 2"):
        grpo.rollout_batch([[5, 6], [4]], [[7, EOS, 9], [8, 8]], EOS, PAD, 2)


# ----------------------------------------------------------------------------- advantages
def numpy_advantages(rewards, group_size, scale):
    """Written from TRL's description: group mean, ddof=1 std of the group or the batch, + 1e-4."""
    out = []
    for group in np.asarray(rewards, np.float64).reshape(-1, group_size):
        std = np.std(group, ddof=1) if scale == "group" else np.std(rewards, ddof=1)
        centred = group - group.mean()
        out.extend(centred if scale == "none" else centred / (std + 1e-4))
    return np.array(out)


@pytest.mark.parametrize("scale", grpo.SCALE_REWARDS)
def test_group_advantages_equal_numpy(scale):
    rewards = np.array([1.0, 0.0, 0.0, 1.0,  0.5, 0.5, 0.5, 0.5,  2.0, -1.0, 0.25, 0.0], np.float32)
    result = grpo.group_advantages(rewards, 4, scale)
    np.testing.assert_allclose(result.advantages, numpy_advantages(rewards, 4, scale), rtol=1e-6, atol=1e-7)
    assert np.isfinite(result.advantages).all()
    assert (result.advantages[4:8] == 0).all()  # the tied group teaches nothing
    assert result.tied_groups == pytest.approx(1 / 3)
    assert result.frac_reward_zero_std == (pytest.approx(1 / 3) if scale != "batch" else 0.0)


def test_unscorable_rewards_are_left_out_and_get_advantage_zero():
    rewards = np.array([1.0, np.nan, 0.0, 0.5,  np.nan, np.nan, 3.0, np.nan])
    result = grpo.group_advantages(rewards, 4, "group")
    kept = np.array([1.0, 0.0, 0.5])
    expected = (kept - kept.mean()) / (np.std(kept, ddof=1) + 1e-4)
    np.testing.assert_allclose(result.advantages[[0, 2, 3]], expected, rtol=1e-6)
    # NaN rewards and the group with a single scored completion (std undefined) get 0, never NaN.
    np.testing.assert_array_equal(result.advantages[[1, 4, 5, 6, 7]], 0.0)
    assert result.tied_groups == 0.5


# ----------------------------------------------------------------------------- options, reference, sampling
@pytest.mark.parametrize("options,message", [
    (dict(loss_type="grpoo"), "grpo.loss_type is 'grpoo', which is unknown; expected one of grpo, bnpo, dr_grpo."),
    (dict(loss_type="dapo"), "grpo.loss_type 'dapo' is one of TRL's that phi2_jax does not implement; expected one "
                             "of grpo, bnpo, dr_grpo."),
    (dict(num_generations=1), "grpo.num_generations is 1; expected an integer >= 2 (advantages compare completions "
                              "of the same prompt)."),
    (dict(epsilon=0.0), "grpo.epsilon is 0.0; expected a number > 0 and < 1."),
    (dict(epsilon_high=-1.0), "grpo.epsilon_high is -1.0; expected a number > 0 (or unset: epsilon)."),
    (dict(beta=-0.1), "grpo.beta is -0.1; expected a number >= 0 (0: no KL term, no reference)."),
    (dict(scale_rewards="groups"), "grpo.scale_rewards is 'groups'; expected one of group, batch, none."),
    (dict(max_completion_length=0), "grpo.max_completion_length is 0; expected a positive integer."),
    (dict(temperature=0.0), "grpo.temperature is 0.0; expected a number > 0 (GRPO samples)."),
    (dict(top_p=1.5), "grpo.top_p is 1.5; expected a number in (0, 1]."),
    (dict(num_generations=4, batch_size=6), "grpo.num_generations 4 does not divide the batch of 6 completions; "
                                            "expected whole groups in every batch."),
])
def test_bad_options_are_refused_in_one_sentence(options, message):
    with pytest.raises(ConfigError) as error:
        grpo.check_grpo_options(**options)
    assert str(error.value) == message
    grpo.check_grpo_options()  # the defaults are fine


def test_lora_reference_is_the_base_and_no_reference_is_refused(setup):
    folder, _ = setup
    base = phi2_jax.from_pretrained(folder)
    batch = our_batch()
    options = dict(beta=0.05, loss_type="grpo", max_completion_length=MAX_COMPLETION, temperature=TEMPERATURE)
    graphdef, state = nnx.split(base)
    with pytest.raises(ConfigError) as error:
        grpo.grpo_loss_sums(graphdef, nnx.to_pure_dict(state), batch, **options)
    assert str(error.value) == ("grpo.beta > 0 needs a reference: set model.lora_rank > 0 (the reference is then the "
                                "base with the adapters off) or give ref_logps in the batch.")

    adapted = phi2_jax.from_pretrained(folder, lora_rank=4, lora_alpha=8.0, lora_targets=("q_proj", "fc1"))
    graphdef, state = nnx.split(adapted)
    rng = np.random.default_rng(1)
    params = unflatten({k: (rng.normal(0, 0.1, v.shape).astype(np.float32) if k.endswith("lora_b") else v)
                        for k, v in flatten(nnx.to_pure_dict(state)).items()})
    base_logps, _ = grpo.completion_logps(base, batch, temperature=TEMPERATURE)
    implicit = grpo.grpo_loss_sums(graphdef, params, batch, **options)
    explicit = grpo.grpo_loss_sums(graphdef, params, {**batch, "ref_logps": base_logps}, **options)
    np.testing.assert_allclose(float(implicit[0]), float(explicit[0]), rtol=1e-6)
    np.testing.assert_allclose(float(implicit[2]["kl"]), float(explicit[2]["kl"]), rtol=1e-5)
    assert float(implicit[2]["kl"]) > 1e-4  # the adapters matter: policy and reference differ


def test_sampling_is_reproducible_under_a_seed(setup):
    folder, _ = setup
    model = phi2_jax.from_pretrained(folder)
    prompts = [[5, 17, 42], [23, 8]]
    first = grpo.sample_completions(model, prompts, 3, 5, temperature=1.0, top_p=0.95, seed=7, eos_id=EOS)
    again = grpo.sample_completions(model, prompts, 3, 5, temperature=1.0, top_p=0.95, seed=7, eos_id=EOS)
    other = grpo.sample_completions(model, prompts, 3, 5, temperature=1.0, top_p=0.95, seed=8, eos_id=EOS)
    assert first == again
    assert first[0] != other[0]
    completions, truncated = first
    assert len(completions) == 6
    for ids, cut in zip(completions, truncated):
        assert 1 <= len(ids) <= 5
        assert cut == (EOS not in ids)
        assert EOS not in ids[:-1]  # cut after the first EOS
