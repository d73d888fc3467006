"""`from_pretrained`: a model from a Hugging Face Phi folder or an Orbax checkpoint, placed on a mesh.

The folder is what a user downloaded: `config.json` in any dialect plus
safetensors weights (single file or shards) in the transformers or phi-msft
layout. Names, shapes and completeness are checked against the config before
any weight is placed, so a bad folder fails with one sentence and no half-built model.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from phi2_jax.checkpoint.run_checkpoints import read_meta, restore_params, step_dirs
from phi2_jax.config import PhiConfig
from phi2_jax.errors import UserInputError, WeightsError
from phi2_jax.hf.files import HFWeights
from phi2_jax.util.host_arrays import numpy_dtype
from phi2_jax.hf.layout import detect_layout, flatten, hf_names_and_shapes, to_params, unflatten
from phi2_jax.model.lora import fresh_adapters, is_adapter
from phi2_jax.model.transformer import Phi, abstract_model, place_state
from phi2_jax.sharding import state_shardings, with_shardings

log = logging.getLogger(__name__)
T = TypeVar("T")


def default_compute_dtype() -> str:
    """bfloat16 on accelerators (tensor cores), float32 on the CPU (where bf16 matmuls are slow and inexact)."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def our_shapes(config: PhiConfig, adapters: bool = False) -> dict[str, tuple[int, ...]]:
    """'/'-joined parameter path -> shape, with no arrays allocated (LoRA adapters only if asked)."""
    state = nnx.state(abstract_model(config), nnx.Param)
    shapes = {path: tuple(x.shape) for path, x in flatten(nnx.to_pure_dict(state)).items()}
    return shapes if adapters else {p: s for p, s in shapes.items() if not is_adapter(p)}


def check_hf_tensors(weights: HFWeights, config: PhiConfig, layout: str, shapes: dict | None = None) -> None:
    """Refuses a folder whose tensors are missing, unexpected, or shaped unlike its config.json.

    `shapes`: `our_shapes(config)` when the caller has it already.
    """
    expected = hf_names_and_shapes(config, layout, shapes or our_shapes(config))
    present = set(weights.names)
    missing = [n for n in expected if n not in present]
    if missing:
        raise WeightsError(f"{weights.folder} is missing tensor '{missing[0]}' ({len(missing)} missing in all) "
                           f"that config.json implies for the {layout} layout.")
    unexpected = sorted(present - set(expected))
    if unexpected:
        raise WeightsError(f"{weights.folder} has unexpected tensor '{unexpected[0]}' ({len(unexpected)} in all); "
                           f"expected only the {layout} layout's tensors for this config.json.")
    for name, shape in expected.items():
        found = weights.shape(name)
        if found != shape:
            raise WeightsError(f"{weights.folder}: tensor '{name}' has shape {list(found)} but config.json implies {list(shape)}.")


def report_nonfinite(weights: HFWeights) -> str | None:
    """One sentence on the NaN / infinite weights read under allow_nonfinite, or None if there were none."""
    if not weights.nonfinite:
        return None
    first, count = next(iter(weights.nonfinite.items()))
    total = len(weights.nonfinite)
    return (f"{weights.folder}: {total} tensor{'s' * (total > 1)} hold NaN or infinite values (first '{first}': "
            f"{count:,}); loaded as they are because allow_nonfinite is set.")


def load_hf_params(path: str | Path, config: PhiConfig, allow_nonfinite: bool = False) -> dict[str, np.ndarray]:
    """Our flat parameter dict (numpy, `config.param_dtype`) from a Hugging Face folder.

    A tensor holding NaN or infinity is refused unless `allow_nonfinite` (then it is reported as a warning).
    """
    weights = HFWeights(path, allow_nonfinite=allow_nonfinite)
    layout = detect_layout(weights.names, str(weights.folder))
    all_shapes = our_shapes(config, adapters=True)  # one abstract trace serves the check, the import and LoRA
    base_shapes = {p: s for p, s in all_shapes.items() if not is_adapter(p)}
    check_hf_tensors(weights, config, layout, base_shapes)
    dtype = numpy_dtype(config.param_dtype)
    params = to_params(config, layout, weights.read, base_shapes, dtype)
    if report_nonfinite(weights):
        warnings.warn(report_nonfinite(weights), stacklevel=3)
    return {**params, **fresh_adapters(all_shapes, dtype)}  # no adapters unless lora_rank > 0


def newest_restorable(path: str | Path, restore: Callable[[Path], T]) -> T:
    """`restore(step_dir)` for the newest step directory of `path` that restores.

    As the trainer does, a damaged newest checkpoint of a run is reported in one
    line and the one before it used; a damaged checkpoint with none before it
    (or a step directory named explicitly) is a `WeightsError`.
    """
    candidates = step_dirs(path)
    for i, step_dir in enumerate(candidates):
        try:
            return restore(step_dir)
        except UserInputError:
            raise
        except Exception as error:  # orbax / tensorstore raise many types for a damaged checkpoint
            first_line = (str(error).splitlines() or [""])[0][:200]
            reason = f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__
            if i + 1 == len(candidates):
                newer = f", and so are the {i} newer one{'s' * (i > 1)}" if i else ""
                raise WeightsError(f"{step_dir} could not be restored ({reason}); the checkpoint is damaged{newer}.") from None
            log.warning("%s could not be restored (%s); using the previous checkpoint, %s.", step_dir, reason,
                        candidates[i + 1])
    raise WeightsError(f"{path} holds no checkpoint.")  # callers check step_dirs first


def load_config(path: str | Path, **runtime: Any) -> PhiConfig:
    """The model config of a Hugging Face folder, a converted checkpoint or a training run folder."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path} does not exist; expected a Hugging Face model folder, a checkpoint or a run folder.")
    if step_dirs(path):
        return newest_restorable(path, lambda step_dir: PhiConfig.from_dict(
            {**read_meta(step_dir)["model_config"], **runtime}))
    if (path / "config.json").is_file():
        return PhiConfig.from_hf_file(path, **runtime)
    raise WeightsError(f"{path} has neither config.json nor an Orbax checkpoint; expected a Hugging Face model folder, "
                       f"a converted checkpoint or a training run folder.")


def from_pretrained(
    path: str | Path,
    *,
    dtype: str = "float32",
    compute_dtype: str | None = None,
    mesh: Mesh | None = None,
    allow_nonfinite: bool = False,
    **config_changes: Any,
) -> Phi:
    """Loads a Phi model from a Hugging Face folder, a converted Orbax checkpoint, or a training run folder.

    dtype: parameter dtype ('float32' default, or 'bfloat16' / 'float16').
    compute_dtype: matmul dtype; default bfloat16 on accelerators, float32 on the CPU.
    mesh: a `phi2_jax.make_mesh(...)` mesh; weights go straight to their shards
      (from an Orbax checkpoint each device reads only its own slices).
      A run folder whose newest checkpoint is damaged loads the previous one, with a warning saying so.
    allow_nonfinite: load a Hugging Face folder whose weights hold NaN or infinity (with a warning);
      by default such a folder is refused, naming the tensor.
    config_changes: run-time fields of `PhiConfig`, e.g. remat='full', attention_backend='xla'.
    """
    runtime = {"param_dtype": dtype, "compute_dtype": compute_dtype or default_compute_dtype(), **config_changes}
    if not step_dirs(path):
        config = load_config(path, **runtime)
        return place_state(abstract_model(config, mesh), unflatten(load_hf_params(path, config, allow_nonfinite)), mesh)

    def restore(step_dir: Path) -> Phi:
        config = PhiConfig.from_dict({**read_meta(step_dir)["model_config"], **runtime})
        graphdef, state = nnx.split(abstract_model(config, mesh))
        shardings = (nnx.to_pure_dict(state_shardings(state, mesh)) if mesh is not None
                     else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        return nnx.merge(graphdef, restore_params(step_dir, with_shardings(nnx.to_pure_dict(state), shardings)))

    return newest_restorable(path, restore)


def default_tokenizer_path(model_path: Path) -> Path:
    """The tokenizer that belongs with a model folder, converted checkpoint or training run."""
    if (model_path / "tokenizer.json").is_file():
        return model_path
    for step_dir in step_dirs(model_path):  # the newest whose meta reads (from_pretrained reports a damaged one)
        try:
            recorded = read_meta(step_dir).get("tokenizer")
        except Exception:  # a damaged checkpoint: the one before it records the same run's tokenizer
            continue
        if recorded:
            return Path(recorded)
        break
    raise UserInputError(f"{model_path} has no tokenizer.json and records no tokenizer; pass --tokenizer.")
