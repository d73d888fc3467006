"""Device mesh and logical-axis sharding rules.

Every weight and the main activations carry logical axis names ('vocab',
'embed', 'heads', ...). `LOGICAL_RULES` maps each name to mesh axes of the
named mesh (`data`, `fsdp`, `tensor`); changing parallelism means changing the
mesh shape or the rules, never the model code.

  data   : pure data parallelism (replicated weights, split batch)
  fsdp   : batch split AND weights split along 'embed' (ZeRO-3 style)
  tensor : Megatron-style split of heads / mlp / vocab
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from phi2_jax.errors import ConfigError, did_you_mean

MESH_AXES = ("data", "fsdp", "tensor")
# GSPMD-style propagation: the compiler fills in what the constraints leave open.
_AUTO = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)

# logical name -> mesh axis (or tuple of axes, or None for replicated).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # weights
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "norm": None,
    "layers": None,
    "lora_rank": None,
    # activations
    "act_batch": ("data", "fsdp"),
    "act_length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_head_dim": None,
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


@dataclasses.dataclass
class MeshConfig:
    """Mesh shape; one axis may be -1 to take all remaining devices (also the run config's `mesh` section)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MeshConfig:
        for key in values:
            if key not in MESH_AXES:
                raise ConfigError(f"unknown mesh axis '{key}'; expected some of {', '.join(MESH_AXES)}.{did_you_mean(key, MESH_AXES)}")
        return cls(**values)

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """Concrete (data, fsdp, tensor) sizes for `num_devices` devices."""
        sizes = [self.data, self.fsdp, self.tensor]
        for name, size in zip(MESH_AXES, sizes):
            if not isinstance(size, int) or (size < 1 and size != -1):
                raise ConfigError(f"mesh.{name} must be a positive integer or -1, got {size!r}.")
        if sizes.count(-1) > 1:
            raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} has more than one axis set to -1; expected at most one.")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} devices: {num_devices} is not a multiple of {known}.")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but {num_devices} are available.")
        return tuple(sizes)


def make_mesh(config: MeshConfig | dict | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` with axes ('data', 'fsdp', 'tensor') over `devices` (default: all)."""
    if config is None:
        config = MeshConfig()
    elif isinstance(config, dict):
        config = MeshConfig.from_dict(config)
    devices = list(jax.devices() if devices is None else devices)
    shape = config.resolve(len(devices))
    if len(devices) == len(jax.devices()):
        # Lets JAX lay the axes out along the physical interconnect (tensor innermost).
        return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=_AUTO)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=_AUTO)


def logical_to_spec(
    names: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: dict[str, Any] = LOGICAL_RULES,
) -> PartitionSpec:
    """PartitionSpec for logical axis `names`.

    With `shape` and `mesh`, a dimension that the mesh axes do not divide stays
    replicated instead of failing (e.g. a 4-row norm on an 8-way axis), and mesh
    axes of size 1 are dropped so specs read cleanly.
    """
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(names):
        axes = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise KeyError(f"logical axis '{name}' has no sharding rule")
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
        axes = tuple(a for a in axes if a not in used)  # a mesh axis may shard one dim only
        if shape is not None and mesh is not None and axes:
            if shape[dim] % math.prod(mesh.shape[a] for a in axes):
                axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(abstract_state: Any, mesh: Mesh, rules: dict[str, Any] = LOGICAL_RULES) -> Any:
    """NamedSharding for every Variable of an (abstract) nnx.State, from its `logical_axes` metadata."""

    def sharding_of(variable):
        names = variable.get_metadata().get("logical_axes")
        shape = variable.get_value().shape
        assert names is not None and len(names) == len(shape), f"variable {shape} lacks logical_axes"
        return variable.replace(NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules)))

    return jax.tree.map(sharding_of, abstract_state, is_leaf=_is_variable)


def with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree`'s leaves carrying `shardings` (one per leaf, or one for all): a placement target."""
    if not isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)


def constrain(x: jax.Array, names: Sequence[str | None], mesh: Mesh | None) -> jax.Array:
    """Pins an activation's sharding by logical names (no-op without a multi-device mesh)."""
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh)))
