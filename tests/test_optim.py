"""Learning-rate schedules and weight decay against closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi2_jax.training.optim import decay_mask, learning_rate_schedule, make_optimizer
from phi2_jax.training.run_config import OptimSection


def test_warmup_then_cosine_matches_the_formula():
    lr, steps, warmup, floor = 1e-3, 110, 10, 0.1
    schedule = learning_rate_schedule(lr, steps, warmup, "cosine", floor)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(lr * 5 / 10)
    for step in (10, 40, 60, 110):
        t = (step - warmup) / (steps - warmup)
        expected = lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5)


def test_linear_and_constant_schedules():
    assert float(learning_rate_schedule(1.0, 20, 10, "linear", 0.0)(15)) == pytest.approx(0.5)
    assert float(learning_rate_schedule(1.0, 20, 10, "constant", 0.0)(19)) == pytest.approx(1.0)


def test_weight_decay_only_on_matrices():
    params = {"embed_tokens": jnp.ones((4, 2)), "lm_head": {"kernel": jnp.ones((2, 4)), "bias": jnp.ones(4)},
              "final_layernorm": {"scale": jnp.ones(2), "bias": jnp.ones(2)}}
    assert decay_mask(params) == {"embed_tokens": True, "lm_head": {"kernel": True, "bias": False},
                                  "final_layernorm": {"scale": False, "bias": False}}
    # With zero gradients Adam's step is 0, so AdamW moves each parameter by -lr * wd * p exactly where decayed.
    tx, schedule = make_optimizer(OptimSection(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5), 10)
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, state, params)
    np.testing.assert_allclose(updates["lm_head"]["kernel"], -0.1 * 0.5 * np.ones((2, 4)), rtol=1e-6)
    np.testing.assert_allclose(updates["embed_tokens"], -0.05 * np.ones((4, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["lm_head"]["bias"], np.zeros(4))
    np.testing.assert_array_equal(updates["final_layernorm"]["scale"], np.zeros(2))
