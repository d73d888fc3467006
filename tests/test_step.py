"""training/step.py on 8 fake CPU devices: the optimiser state is laid out like the parameters it belongs to."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import phi2_jax
from phi2_jax.hf.layout import flatten
from phi2_jax.training.optim import make_optimizer
from phi2_jax.training.run_config import OptimSection
from phi2_jax.training.step import build_steps


@pytest.mark.parametrize("axes", [{"data": 2, "fsdp": 2, "tensor": 2}, {"data": 1, "fsdp": 8, "tensor": 1},
                                  {"data": 8, "fsdp": 1, "tensor": 1}], ids=["data-fsdp-tensor", "fsdp", "data"])
@pytest.mark.parametrize("lora", [False, True])
def test_every_optimizer_leaf_is_sharded_like_its_parameter(axes, lora):
    mesh = phi2_jax.make_mesh(axes)
    config = phi2_jax.preset("nano", lora_rank=4 if lora else 0)
    tx, schedule = make_optimizer(OptimSection(), 10)
    steps = build_steps(config, mesh, tx, schedule, seed=0, grad_accum=1, z_loss=0.0)
    params = flatten(steps.param_shardings)
    mu_nu = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(steps.opt_shardings):
        keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
        name = "/".join(str(k) for k in keys if isinstance(k, str))
        owner = next((p for p in params if name.endswith(p)), None)
        if owner is None:  # step counters and the like: replicated scalars
            assert leaf.spec == PartitionSpec(), (name, leaf)
            continue
        mu_nu += 1
        assert leaf == params[owner], (name, leaf.spec, params[owner].spec)
    trainable = sum(1 for p in params if not lora or "lora_" in p)
    assert mu_nu == 2 * trainable  # AdamW keeps mu and nu for each trainable parameter
    # The abstract state that restore and AOT compiles use carries the same shardings.
    for abstract, sharding in zip(jax.tree.leaves(steps.abstract_opt_state), jax.tree.leaves(steps.opt_shardings)):
        assert abstract.sharding == sharding
    # And a real initialisation lands where the shardings say: each device holds 1/N of a sharded leaf.
    model = phi2_jax.create_model(config, mesh=mesh)
    from flax import nnx
    opt_state = steps.init_opt(nnx.to_pure_dict(nnx.state(model)))
    for array, sharding in zip(jax.tree.leaves(opt_state), jax.tree.leaves(steps.opt_shardings)):
        assert array.sharding.is_equivalent_to(sharding, array.ndim)
        shard = array.addressable_shards[0].data
        assert shard.size == array.size // int(np.prod([mesh.shape[a] for axes_ in sharding.spec if axes_
                                                          for a in ((axes_,) if isinstance(axes_, str) else axes_)]))
