"""Sharded model on 8 fake CPU devices (data=2, fsdp=2, tensor=2) against the single-device model."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import phi2_jax
from phi2_jax import ConfigError, MeshConfig, make_mesh
from phi2_jax.hf.layout import flatten
from phi2_jax.sharding import logical_to_spec

CONFIG = dict(dialect="5.x", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, partial_rotary_factor=0.5)


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    return make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def test_sharded_logits_equal_single_device(hf_folder, mesh):
    folder, _ = hf_folder("sharding", **CONFIG)
    single = phi2_jax.from_pretrained(folder)
    sharded = phi2_jax.from_pretrained(folder, mesh=mesh)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 96, (4, 12))
    mask = np.ones((4, 12), np.int32)
    mask[1, :3] = 0
    ref = np.asarray(single(ids, attention_mask=mask))
    out = sharded(ids, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert out.sharding.spec == P(("data", "fsdp"), None, "tensor")  # logits stay split by batch and vocab


def test_weights_really_are_sharded(hf_folder, mesh):
    folder, _ = hf_folder("sharding", **CONFIG)
    model = phi2_jax.from_pretrained(folder, mesh=mesh)
    params = flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    expected = {
        "embed_tokens": P("tensor", "fsdp"),
        "layers/self_attn/q_proj/kernel": P(None, "fsdp", "tensor"),
        "layers/self_attn/dense/kernel": P(None, "tensor", "fsdp"),
        "layers/mlp/fc1/kernel": P(None, "fsdp", "tensor"),
        "layers/mlp/fc2/kernel": P(None, "tensor", "fsdp"),
        "layers/mlp/fc1/bias": P(None, "tensor"),
        "lm_head/kernel": P("fsdp", "tensor"),
        "layers/input_layernorm/scale": P(None, None),
    }
    for path, spec in expected.items():
        array = params[path]
        assert array.sharding.spec == spec, path
    fc1 = params["layers/mlp/fc1/kernel"]  # [2, 32, 64] split 2 x 2 -> each device holds a quarter
    assert {s.data.shape for s in fc1.addressable_shards} == {(2, 16, 32)}


def test_create_model_initialises_in_place(mesh):
    model = phi2_jax.create_model(phi2_jax.preset("nano"), mesh=mesh)
    kernel = model.layers.mlp.fc1.kernel.get_value()
    assert kernel.sharding.spec == P(None, "fsdp", "tensor")
    assert all(s.data.size == kernel.size // 4 for s in kernel.addressable_shards)


def test_indivisible_dims_stay_replicated(mesh):
    assert logical_to_spec(("vocab", "embed"), (7, 32), mesh) == P(None, "fsdp")


def test_mesh_fills_minus_one_and_refuses_impossible_shapes():
    assert MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8) == (2, 2, 2)
    with pytest.raises(ConfigError, match=r"needs 12 devices but 8 are available"):
        MeshConfig(data=3, fsdp=2, tensor=2).resolve(8)
    with pytest.raises(ConfigError, match=r"cannot fill 8 devices: 8 is not a multiple of 3"):
        MeshConfig(data=3, fsdp=-1, tensor=1).resolve(8)
    with pytest.raises(ConfigError, match=r"unknown mesh axis 'tensr'.*Did you mean 'tensor'"):
        MeshConfig.from_dict({"tensr": 2})
