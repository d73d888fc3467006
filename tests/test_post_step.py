"""Accumulated post-training gradients: one division by the whole batch's count, equal to the one-shot loss."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import phi2_jax
from phi2_jax.data.formats import Example, PreferencePair
from phi2_jax.data.post_batches import pack_examples, preference_rows
from phi2_jax.training.post_step import accumulate, objective_loss_sums
from phi2_jax.training.step import partition

CFG = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           partial_rotary_factor=0.5, max_position_embeddings=128)


def random_example(rng, n, prompt):
    return Example(rng.integers(1, 512, n).astype(np.int32), np.r_[np.zeros(prompt), np.ones(n - prompt)].astype(np.float32))


def stacked(*batches):
    return {k: jnp.stack([b[k] for b in batches]) for k in batches[0]}


def lora_model(hf_folder):
    folder, _ = hf_folder("post_step", **CFG)
    model = phi2_jax.from_pretrained(folder, lora_rank=4, lora_targets=("q_proj", "v_proj", "fc1"))
    graphdef, state = nnx.split(model)
    params = jax.tree.map(lambda x: x + 0.05 if x.ndim == 3 and x.shape[-2] == 4 else x, nnx.to_pure_dict(state))
    return graphdef, partition(params, lora=True)


def test_sft_accumulation_is_one_division_over_the_batch(hf_folder):
    graphdef, (trainable, frozen) = lora_model(hf_folder)
    rng = np.random.default_rng(0)
    first = pack_examples([random_example(rng, 12, 3), random_example(rng, 9, 2)], 24, 0)   # 9 + 7 counted targets
    second = pack_examples([random_example(rng, 20, 17)], 24, 0)                            # 3 counted targets
    loss_sums = objective_loss_sums("sft", graphdef)
    grads, loss, metrics = jax.jit(lambda t: accumulate(loss_sums, t, frozen, stacked(first, second), None, 2))(trainable)
    assert float(metrics["count"]) == 19

    def one_shot(t):  # every row in one call: the sum over all counted tokens / their number
        total, count, _ = loss_sums(t, frozen, {k: jnp.concatenate([first[k], second[k]]) for k in first}, None)
        return total / count

    value, expected = jax.jit(jax.value_and_grad(one_shot))(trainable)
    np.testing.assert_allclose(float(loss), float(value), rtol=1e-6)
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-6 * np.abs(e).max())
    means = [float(loss_sums(trainable, frozen, b, None)[0] / loss_sums(trainable, frozen, b, None)[1]) for b in (first, second)]
    assert abs(np.mean(means) - float(loss)) > 1e-3  # a mean of means would differ


def test_dpo_accumulation_averages_over_pairs_and_metrics(hf_folder):
    graphdef, (trainable, frozen) = lora_model(hf_folder)
    rng = np.random.default_rng(1)
    pairs = [PreferencePair(rng.integers(1, 512, 4), rng.integers(1, 512, n), rng.integers(1, 512, m))
             for n, m in [(3, 5), (6, 2), (4, 4), (2, 7)]]
    rows = [preference_rows(pairs[:2], 16, 0), preference_rows(pairs[2:], 16, 0)]
    loss_sums = objective_loss_sums("dpo", graphdef, beta=0.2, loss_type="sigmoid")
    grads, loss, metrics = jax.jit(lambda t: accumulate(loss_sums, t, frozen, stacked(*rows), None, 2))(trainable)
    everything = preference_rows(pairs, 16, 0)
    total, count, sums = jax.jit(lambda t: loss_sums(t, frozen, everything, None))(trainable)
    np.testing.assert_allclose(float(loss), float(total / count), rtol=1e-6)
    for key, value in sums.items():
        np.testing.assert_allclose(float(metrics[key]), float(value / count), rtol=1e-5, atol=1e-7, err_msg=key)
    expected = jax.jit(jax.grad(lambda t: loss_sums(t, frozen, everything, None)[0] / 4))(trainable)
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-6 * np.abs(e).max())
