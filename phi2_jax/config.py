"""Model configuration: one typed dataclass, named presets, and Hugging Face `config.json` dialects.

A `PhiConfig` holds the architecture (what a Hugging Face `config.json` says)
and a few run-time choices that do not change the function the model computes
(parameter dtype, compute dtype, remat policy, attention backend). It is
validated on construction, so an impossible config never reaches the model.

Three `config.json` dialects are read:
  * transformers 5.x: `rope_parameters = {"rope_theta", "partial_rotary_factor", ...}`;
  * transformers 4.x: `rope_theta` and `partial_rotary_factor` at the top level;
  * the first phi-2 upload (`model_type: phi-msft`): `n_embd`, `n_layer`, `rotary_dim`, ...
and `to_hf_dict` writes the 5.x dialect with the 4.x keys alongside, which
both transformers generations load.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from phi2_jax.errors import ConfigError, did_you_mean

ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu", "silu")
REMAT_POLICIES = ("none", "full", "save_dots")
ATTENTION_BACKENDS = ("auto", "xla", "cudnn")
DTYPES = ("float32", "bfloat16", "float16")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")
WEIGHT_GRADS = ("native", "transposed")  # see model/dense.py



def _runtime(default: Any, **kwargs: Any) -> Any:
    """A run-time field: it changes speed, memory or training noise, not the architecture a checkpoint holds,
    so a fine-tune may set it on top of the model it starts from."""
    return dataclasses.field(default=default, metadata={"runtime": True}, **kwargs)


@dataclasses.dataclass(frozen=True)
class PhiConfig:
    """Architecture and numerics of a Phi model. Field names follow transformers' `PhiConfig`.

    Fields made with `_runtime` are run-time choices (`RUNTIME_FIELDS`); the rest is the architecture.
    """

    vocab_size: int = 51200
    hidden_size: int = 2560
    intermediate_size: int = 10240
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads
    partial_rotary_factor: float = 0.4
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu_new"
    max_position_embeddings: int = 2048
    qk_layernorm: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    # Dropout: read from config.json, but only training noise.
    resid_pdrop: float = _runtime(0.1)
    embd_pdrop: float = _runtime(0.0)
    attention_dropout: float = _runtime(0.0)  # refused unless 0: no attention backend applies it
    param_dtype: str = _runtime("float32")
    compute_dtype: str = _runtime("float32")
    remat: str = _runtime("none")
    attention_backend: str = _runtime("auto")
    weight_grad: str = _runtime("native")     # 'transposed': XLA:CPU's faster weight gradient (model/dense.py)
    # LoRA adapters (fine-tuning): rank 0 = none. The adapters change the function, not the base architecture.
    lora_rank: int = _runtime(0)
    lora_alpha: float = _runtime(16.0)
    lora_targets: tuple[str, ...] = _runtime(("q_proj", "v_proj"))

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if isinstance(self.lora_targets, (list, str)):  # from YAML / JSON
            targets = [self.lora_targets] if isinstance(self.lora_targets, str) else self.lora_targets
            object.__setattr__(self, "lora_targets", tuple(targets))
        self._validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head that get rotary embedding (transformers truncates with int())."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def num_params(self) -> int:
        """Parameter count from the closed form (no arrays are built)."""
        h, f, v, n = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        attn = h * h + h + 2 * (h * self.kv_dim + self.kv_dim) + h * h + h
        qk_norm = 4 * self.head_dim if self.qk_layernorm else 0
        layer = 2 * h + attn + qk_norm + (h * f + f) + (f * h + h)
        return v * h + n * layer + 2 * h + (h * v + v)

    def replace(self, **changes: Any) -> PhiConfig:
        """A copy with `changes` applied (validated like a new config)."""
        unknown = [k for k in changes if k not in _FIELD_NAMES]
        if unknown:
            raise ConfigError(f"unknown model config field '{unknown[0]}'.{did_you_mean(unknown[0], _FIELD_NAMES)}")
        if ("num_attention_heads" in changes and "num_key_value_heads" not in changes
                and self.num_key_value_heads == self.num_attention_heads):
            changes["num_key_value_heads"] = None  # plain multi-head attention stays plain
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PhiConfig:
        """Builds a config from our own field names; an unknown field is refused with a suggestion."""
        for key in values:
            if key not in _FIELD_NAMES:
                raise ConfigError(f"unknown model config field '{key}'.{did_you_mean(key, _FIELD_NAMES)}")
        return cls(**values)

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; expected a multiple so that every head has the same size.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by num_key_value_heads "
                f"{self.num_key_value_heads}; expected each key/value head to serve a whole group of query heads.")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ConfigError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor!r}.")
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            raise ConfigError(
                f"partial_rotary_factor {self.partial_rotary_factor} gives rotary dimension {self.rotary_dim} "
                f"of head_dim {self.head_dim}; expected an even, non-zero number because rotary embedding "
                f"rotates pairs of dimensions.")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta!r}.")
        if not 0.0 < self.layer_norm_eps < 1.0:
            raise ConfigError(f"layer_norm_eps must be a small positive number, got {self.layer_norm_eps!r}.")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act '{self.hidden_act}' is not supported; expected one of {', '.join(ACTIVATIONS)}.")
        for name in ("resid_pdrop", "embd_pdrop", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be a probability in [0, 1), got {value!r}.")
        if self.attention_dropout:
            raise ConfigError(f"attention_dropout {self.attention_dropout} is not supported: cuDNN's fused attention "
                              f"has no dropout, and phi-2 trains with 0.0; expected 0 (resid_pdrop and embd_pdrop "
                              f"are applied).")
        if self.weight_grad not in WEIGHT_GRADS:
            raise ConfigError(f"weight_grad '{self.weight_grad}' is unknown; expected one of {', '.join(WEIGHT_GRADS)}.")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name} '{getattr(self, name)}' is not supported; expected one of {', '.join(DTYPES)}.")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat '{self.remat}' is not a policy; expected one of {', '.join(REMAT_POLICIES)}.")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be a non-negative integer, got {self.lora_rank!r}.")
        for target in self.lora_targets:
            if target not in LORA_TARGETS:
                raise ConfigError(f"lora_targets has '{target}'; expected some of {', '.join(LORA_TARGETS)}.")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"attention_backend '{self.attention_backend}' is unknown; expected one of {', '.join(ATTENTION_BACKENDS)}.")

    # ------------------------------------------------------------------ Hugging Face dialects
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json", **runtime: Any) -> PhiConfig:
        """Reads a Hugging Face Phi `config.json` dict in any of the three dialects.

        `runtime` sets run-time fields (`param_dtype`, `compute_dtype`, `remat`, ...).
        """
        model_type = hf.get("model_type")
        if model_type == "phi-msft" or "n_embd" in hf:
            values = _read_msft(hf, source)
        elif model_type == "phi":
            values = _read_phi(hf, source)
        else:
            raise ConfigError(
                f"{source} has model_type {model_type!r}; expected 'phi' (transformers) or 'phi-msft' (first phi-2 upload).")
        _check_token_ids(values, source)
        return cls.from_dict({**values, **runtime})

    @classmethod
    def from_hf_file(cls, path: str | Path, **runtime: Any) -> PhiConfig:
        """Reads `path` (a `config.json`, or a folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path} does not exist; expected a Hugging Face config.json.")
        try:
            hf = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as error:
            raise ConfigError(f"{path} is not UTF-8 text (byte {error.start}); expected a JSON config.json.") from None
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}).") from None
        except OSError as error:
            raise ConfigError(f"{path} could not be read ({error.strerror}).") from None
        if not isinstance(hf, dict):
            raise ConfigError(f"{path} holds a {type(hf).__name__}; expected a JSON object.")
        return cls.from_hf_dict(hf, source=str(path), **runtime)

    def to_hf_dict(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """The transformers 5.x `config.json` (plus the 4.x top-level rope keys, which 5.x ignores)."""
        return {
            "architectures": ["PhiForCausalLM"],
            "model_type": "phi",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "layer_norm_eps": self.layer_norm_eps,
            "qk_layernorm": self.qk_layernorm,
            "resid_pdrop": self.resid_pdrop,
            "embd_pdrop": self.embd_pdrop,
            "attention_dropout": self.attention_dropout,
            "initializer_range": self.initializer_range,
            "tie_word_embeddings": False,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor,
            },
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
            "dtype": torch_dtype,
            "torch_dtype": torch_dtype,
        }


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(PhiConfig))
RUNTIME_FIELDS = tuple(f.name for f in dataclasses.fields(PhiConfig) if f.metadata.get("runtime"))
_ARCH_FIELDS = tuple(name for name in _FIELD_NAMES if name not in RUNTIME_FIELDS)
# What a config.json says besides the architecture. Not attention_dropout: no backend applies it (refused
# when set), and a model that was trained with it still runs at inference, where dropout is off.
_HF_FIELDS = _ARCH_FIELDS + ("resid_pdrop", "embd_pdrop")

# Keys any transformers version may write that say nothing about the function computed.
_HF_BOOKKEEPING = {
    "_name_or_path", "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype",
    "use_cache", "pad_token_id", "id2label", "label2id", "return_dict", "output_hidden_states",
    "output_attentions", "problem_type", "is_encoder_decoder", "chunk_size_feed_forward",
    "torchscript", "tokenizer_class", "task_specific_params", "model_type", "attention_bias",
}


# The JSON type each architecture field must have in a config.json (a number given as the string "32" is refused,
# not guessed at: the file was written by something that did not mean a Phi config).
_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings", "bos_token_id", "eos_token_id", "rotary_dim")
_FLOAT_FIELDS = ("partial_rotary_factor", "rope_theta", "layer_norm_eps", "resid_pdrop", "embd_pdrop",
                 "attention_dropout", "initializer_range")


def _check_types(values: dict[str, Any], source: str, names: dict[str, str] | None = None) -> None:
    """Refuses a value of the wrong JSON type; `names` maps our field name to the key the file used."""
    names = names or {}
    for key, value in values.items():
        if value is None and key in ("num_key_value_heads", "bos_token_id", "eos_token_id"):
            continue
        if key in _INT_FIELDS:
            expected, ok = "an integer", isinstance(value, int) and not isinstance(value, bool)
        elif key in _FLOAT_FIELDS:
            expected, ok = "a number", isinstance(value, (int, float)) and not isinstance(value, bool)
        elif key == "qk_layernorm":
            expected, ok = "true or false", isinstance(value, bool)
        elif key == "hidden_act":
            expected, ok = "a string", isinstance(value, str)
        else:
            continue
        if not ok:
            raise ConfigError(f"{source} gives '{names.get(key, key)}' as {json.dumps(value)} "
                              f"({_json_type(value)}); expected {expected}.")


def _json_type(value: Any) -> str:
    return {str: "a string", bool: "a boolean", list: "a list", dict: "an object", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _check_token_ids(values: dict[str, Any], source: str) -> None:
    """bos/eos ids must name a token of the vocabulary (an id past its end would index past the embedding)."""
    vocab = values.get("vocab_size")
    for key in ("bos_token_id", "eos_token_id"):
        token = values.get(key)
        if token is not None and isinstance(vocab, int) and not 0 <= token < vocab:
            raise ConfigError(f"{source} has {key} {token}, outside the vocabulary of {vocab} tokens; "
                              f"expected an id in [0, {vocab}).")


def _refuse_unknown(hf: dict[str, Any], known: set[str], source: str) -> None:
    for key in hf:
        if key not in known and key not in _HF_BOOKKEEPING:
            raise ConfigError(f"{source} has unknown field '{key}'.{did_you_mean(key, known)}")


def _read_phi(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """transformers' `model_type: phi`, 4.x (top-level rope keys) or 5.x (`rope_parameters`)."""
    known = set(_HF_FIELDS) | {"attention_dropout", "rope_parameters", "rope_scaling", "tie_word_embeddings"}
    _refuse_unknown(hf, known, source)
    if hf.get("tie_word_embeddings"):
        raise ConfigError(f"{source} sets tie_word_embeddings=true; Phi models have an untied lm_head, expected false.")
    rope = hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{source} gives 'rope_parameters' as {json.dumps(rope)}; expected an object.")
    _check_types({k: v for k, v in rope.items() if k in ("rope_theta", "partial_rotary_factor")}, source,
                 {k: f"rope_parameters.{k}" for k in rope})
    legacy_scaling = hf.get("rope_scaling")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default" or legacy_scaling:
        raise ConfigError(f"{source} asks for rope scaling {rope or legacy_scaling}; only the default rotary embedding is supported.")
    values = {k: hf[k] for k in _HF_FIELDS if k in hf}
    eos = values.get("eos_token_id")
    if isinstance(eos, list):
        if not eos:
            raise ConfigError(f"{source} gives 'eos_token_id' as an empty list; expected an id or a list of ids.")
        values["eos_token_id"] = eos[0]
    _check_types(values, source)
    # 5.x keeps these inside rope_parameters; 4.x at top level. The nested one wins.
    for key in ("rope_theta", "partial_rotary_factor"):
        if key in rope:
            values[key] = rope[key]
    if "partial_rotary_factor" not in values:
        values["partial_rotary_factor"] = 0.5  # transformers' PhiConfig default
    values.setdefault("num_key_value_heads", None)
    # Fields the file omits take transformers' PhiConfig defaults, not phi-2's.
    for key, default in _TRANSFORMERS_DEFAULTS.items():
        values.setdefault(key, default)
    return values


_TRANSFORMERS_DEFAULTS = {
    "vocab_size": 51200, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
    "num_attention_heads": 32, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
    "hidden_act": "gelu_new", "max_position_embeddings": 2048, "layer_norm_eps": 1e-5,
    "rope_theta": 10000.0, "qk_layernorm": False, "bos_token_id": 1, "eos_token_id": 2,
}

# phi-msft name -> our name.
_MSFT_NAMES = {
    "vocab_size": "vocab_size", "n_embd": "hidden_size", "n_inner": "intermediate_size",
    "n_layer": "num_hidden_layers", "n_head": "num_attention_heads", "n_head_kv": "num_key_value_heads",
    "n_positions": "max_position_embeddings", "layer_norm_epsilon": "layer_norm_eps",
    "activation_function": "hidden_act", "resid_pdrop": "resid_pdrop", "embd_pdrop": "embd_pdrop",
    "initializer_range": "initializer_range",
    "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
}
# Switches of the original implementation that pick kernels, not maths.
_MSFT_KERNEL_SWITCHES = {"flash_attn", "flash_rotary", "fused_dense", "img_processor", "checkpointing",
                         "tie_word_embeddings", "rotary_dim", "attn_pdrop"}  # attn_pdrop: see _HF_FIELDS


def _read_msft(hf: dict[str, Any], source: str) -> dict[str, Any]:
    _refuse_unknown(hf, set(_MSFT_NAMES) | _MSFT_KERNEL_SWITCHES, source)
    values = {ours: hf[theirs] for theirs, ours in _MSFT_NAMES.items() if hf.get(theirs) is not None}
    for required in ("n_embd", "n_layer", "n_head"):
        if required not in hf:
            raise ConfigError(f"{source} is a phi-msft config without '{required}'; expected it to give the model size.")
    theirs_of = {ours: theirs for theirs, ours in _MSFT_NAMES.items()}
    _check_types({**values, "rotary_dim": hf.get("rotary_dim", 32)}, source, theirs_of)
    for ours in ("hidden_size", "num_attention_heads"):  # the head size below divides by them
        if values[ours] <= 0:
            raise ConfigError(f"{source} has {theirs_of[ours]} {values[ours]}; expected a positive integer.")
    if values["hidden_size"] % values["num_attention_heads"]:
        raise ConfigError(f"{source} has n_embd {values['hidden_size']}, not divisible by n_head "
                          f"{values['num_attention_heads']}; expected a multiple so that every head has the same size.")
    values.setdefault("intermediate_size", 4 * values["hidden_size"])  # n_inner: null means 4 x n_embd
    head_dim = values["hidden_size"] // values["num_attention_heads"]
    rotary_dim = hf.get("rotary_dim", 32)
    values["partial_rotary_factor"] = rotary_dim / head_dim
    if int(head_dim * values["partial_rotary_factor"]) != rotary_dim:
        raise ConfigError(f"{source} has rotary_dim {rotary_dim} that no fraction of head_dim {head_dim} reproduces.")
    _check_token_ids(values, source)  # the ids the file gives; the default below is phi-2's, kept only if it fits
    default = 50256 if values.get("vocab_size", 51200) > 50256 else None
    values.setdefault("bos_token_id", default)
    values.setdefault("eos_token_id", default)
    return values


# --------------------------------------------------------------------------- presets
PRESETS: dict[str, PhiConfig] = {
    # microsoft/phi-2 config.json, exactly.
    "phi-2": PhiConfig(),
    # microsoft/phi-1_5 (same architecture, smaller).
    "phi-1_5": PhiConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         partial_rotary_factor=0.5, resid_pdrop=0.0),
    # The benchmark's default: big enough that matmuls dominate on a CPU.
    "phi-small": PhiConfig(vocab_size=8192, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                           num_attention_heads=8, partial_rotary_factor=0.5, max_position_embeddings=1024,
                           bos_token_id=0, eos_token_id=0),
    # Trains on a laptop CPU in minutes; keeps phi-2's rotary fraction (12 of 32 dims).
    "tiny": PhiConfig(vocab_size=4096, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, partial_rotary_factor=0.4, max_position_embeddings=512,
                      resid_pdrop=0.0, bos_token_id=0, eos_token_id=0),
    # The smallest thing that still exercises every code path; for tests.
    "nano": PhiConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, partial_rotary_factor=0.5, max_position_embeddings=128,
                      resid_pdrop=0.0, bos_token_id=0, eos_token_id=0),
}


def preset(name: str, **changes: Any) -> PhiConfig:
    """A named preset (see `PRESETS`), optionally with fields changed."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset '{name}'; expected one of {', '.join(PRESETS)}.{did_you_mean(name, PRESETS)}")
    return PRESETS[name].replace(**changes) if changes else PRESETS[name]
