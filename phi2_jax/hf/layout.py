"""The one table between our parameter tree and Hugging Face tensor names.

Each `Rule` pairs one Hugging Face tensor name (a template with `{i}` for the
layer) with the parameter(s) of ours it holds and a `Transform` that knows both
directions. Import (`to_params`) and export (`iter_hf_tensors`) walk the same
rules, so the two directions cannot drift apart.

Our paths are '/'-joined keys of `nnx.to_pure_dict(nnx.state(model))`; per-layer
parameters are stacked along a leading layer axis. Two Hugging Face layouts:
  * 'transformers': `model.layers.{i}.self_attn.q_proj.weight`, ... (PhiForCausalLM)
  * 'phi-msft': the first phi-2 upload, with a fused `mixer.Wqkv` (rows: all
    heads' Q, then K, then V).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping

import jax
import numpy as np

from phi2_jax.config import PhiConfig
from phi2_jax.errors import WeightsError

LAYOUTS = ("transformers", "phi-msft")


@dataclasses.dataclass(frozen=True)
class Transform:
    """Both directions of one mapping. `to_ours(hf) -> tuple of ours`, `to_hf(*ours) -> hf`."""

    name: str
    to_ours: Callable[..., tuple]
    to_hf: Callable[..., np.ndarray]


AS_IS = Transform("as_is", lambda w: (w,), lambda w: w)
# torch Linear stores [out, in]; our kernels are [in, out].
LINEAR = Transform("linear", lambda w: (w.T,), lambda k: k.T)


def _fused(split_sizes: Callable[[int], tuple[int, int, int]], linear: bool) -> Transform:
    """Q, K, V stacked along HF's first axis (rows), as in phi-msft's `Wqkv`."""

    def to_ours(w):
        q_rows, k_rows, _ = split_sizes(w.shape[0])
        parts = (w[:q_rows], w[q_rows:q_rows + k_rows], w[q_rows + k_rows:])
        return tuple(p.T for p in parts) if linear else parts

    def to_hf(q, k, v):
        parts = (q.T, k.T, v.T) if linear else (q, k, v)
        xp = jax.numpy if isinstance(q, jax.Array) else np
        return xp.concatenate(parts, axis=0)

    return Transform("fused_qkv" if linear else "fused_qkv_bias", to_ours, to_hf)


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str                 # Hugging Face name; '{i}' marks a per-layer tensor
    ours: tuple[str, ...]   # our parameter path(s), '/'-joined
    transform: Transform

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


def _qkv_sizes(config: PhiConfig):
    return lambda rows: (config.hidden_size, config.kv_dim, config.kv_dim)


def rules(config: PhiConfig, layout: str) -> list[Rule]:
    """All tensors of a model with `config` in `layout`, in Hugging Face's usual order."""
    if layout == "transformers":
        table = [Rule("model.embed_tokens.weight", ("embed_tokens",), AS_IS)]
        layer = "model.layers.{i}."
        table += [
            Rule(layer + "input_layernorm.weight", ("layers/input_layernorm/scale",), AS_IS),
            Rule(layer + "input_layernorm.bias", ("layers/input_layernorm/bias",), AS_IS),
        ]
        for proj in ("q_proj", "k_proj", "v_proj", "dense"):
            table += [
                Rule(layer + f"self_attn.{proj}.weight", (f"layers/self_attn/{proj}/kernel",), LINEAR),
                Rule(layer + f"self_attn.{proj}.bias", (f"layers/self_attn/{proj}/bias",), AS_IS),
            ]
        if config.qk_layernorm:
            for norm in ("q_layernorm", "k_layernorm"):
                table += [
                    Rule(layer + f"self_attn.{norm}.weight", (f"layers/self_attn/{norm}/scale",), AS_IS),
                    Rule(layer + f"self_attn.{norm}.bias", (f"layers/self_attn/{norm}/bias",), AS_IS),
                ]
        mlp, final, head = layer + "mlp.", "model.final_layernorm.", "lm_head."
    elif layout == "phi-msft":
        if config.qk_layernorm:
            raise WeightsError("the phi-msft layout has no qk_layernorm tensors; expected qk_layernorm=false.")
        table = [Rule("transformer.embd.wte.weight", ("embed_tokens",), AS_IS)]
        layer = "transformer.h.{i}."
        qkv = tuple(f"layers/self_attn/{p}_proj" for p in "qkv")
        table += [
            Rule(layer + "ln.weight", ("layers/input_layernorm/scale",), AS_IS),
            Rule(layer + "ln.bias", ("layers/input_layernorm/bias",), AS_IS),
            Rule(layer + "mixer.Wqkv.weight", tuple(p + "/kernel" for p in qkv), _fused(_qkv_sizes(config), True)),
            Rule(layer + "mixer.Wqkv.bias", tuple(p + "/bias" for p in qkv), _fused(_qkv_sizes(config), False)),
            Rule(layer + "mixer.out_proj.weight", ("layers/self_attn/dense/kernel",), LINEAR),
            Rule(layer + "mixer.out_proj.bias", ("layers/self_attn/dense/bias",), AS_IS),
        ]
        mlp, final, head = layer + "mlp.", "lm_head.ln.", "lm_head.linear."
    else:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    for fc in ("fc1", "fc2"):
        table += [
            Rule(mlp + f"{fc}.weight", (f"layers/mlp/{fc}/kernel",), LINEAR),
            Rule(mlp + f"{fc}.bias", (f"layers/mlp/{fc}/bias",), AS_IS),
        ]
    table += [
        Rule(final + "weight", ("final_layernorm/scale",), AS_IS),
        Rule(final + "bias", ("final_layernorm/bias",), AS_IS),
        Rule(head + "weight", ("lm_head/kernel",), LINEAR),
        Rule(head + "bias", ("lm_head/bias",), AS_IS),
    ]
    return table


def detect_layout(names: set[str] | list[str], source: str) -> str:
    """'transformers' or 'phi-msft' from the tensor names in a weights file."""
    names = set(names)
    if "model.embed_tokens.weight" in names:
        return "transformers"
    if "transformer.embd.wte.weight" in names:
        return "phi-msft"
    sample = ", ".join(sorted(names)[:3])
    raise WeightsError(
        f"{source} holds no Phi embedding tensor (found {sample}, ...); expected 'model.embed_tokens.weight' "
        f"(transformers layout) or 'transformer.embd.wte.weight' (phi-msft layout).")


# ----------------------------------------------------------------------------- the tree of ours
def flatten(tree: Mapping) -> dict[str, object]:
    """{'a': {'b': x}} -> {'a/b': x}"""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}/{k}": v for k, v in flatten(value).items()})
        else:
            flat[str(key)] = value
    return flat


def unflatten(flat: Mapping[str, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def hf_names_and_shapes(config: PhiConfig, layout: str, our_shapes: Mapping[str, tuple]) -> dict[str, tuple]:
    """Expected Hugging Face name -> shape, derived by running each rule's `to_hf` on shapes only."""
    expected = {}
    for rule in rules(config, layout):
        structs = [jax.ShapeDtypeStruct(our_shapes[p][1:] if rule.per_layer else our_shapes[p], np.float32)
                   for p in rule.ours]
        shape = jax.eval_shape(rule.transform.to_hf, *structs).shape
        for i in range(config.num_hidden_layers) if rule.per_layer else [None]:
            expected[rule.hf.format(i=i)] = tuple(shape)
    return expected


def tensor_plan(config: PhiConfig, layout: str) -> list[tuple[str, Rule, int | None]]:
    """(HF name, rule, layer or None) for every tensor in file order: embedding, layer 0, layer 1, ..., final norm, head.

    Layer-major order lets a converter hold one layer at a time.
    """
    table = rules(config, layout)
    first = next(i for i, r in enumerate(table) if r.per_layer)
    last = max(i for i, r in enumerate(table) if r.per_layer)
    plan = [(r.hf, r, None) for r in table[:first]]
    for i in range(config.num_hidden_layers):
        plan += [(r.hf.format(i=i), r, i) for r in table[first:last + 1]]
    return plan + [(r.hf, r, None) for r in table[last + 1:]]


def hf_tensor(rule: Rule, get: Callable[[str], np.ndarray]) -> np.ndarray:
    """The HF tensor of `rule`, from our arrays fetched by path (per-layer slices for per-layer rules)."""
    return rule.transform.to_hf(*(get(p) for p in rule.ours))


def iter_hf_tensors(config: PhiConfig, layout: str, flat_params: Mapping[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face name, array) for every tensor of a stacked flat parameter dict, in file order."""
    for name, rule, layer in tensor_plan(config, layout):
        yield name, hf_tensor(rule, lambda p: flat_params[p] if layer is None else flat_params[p][layer])


def to_params(
    config: PhiConfig,
    layout: str,
    read: Callable[[str], np.ndarray],
    our_shapes: Mapping[str, tuple],
    dtype,
) -> dict[str, np.ndarray]:
    """Our flat stacked parameter dict (numpy, `dtype`), reading each HF tensor once: the import direction."""
    out = {path: np.empty(shape, dtype) for path, shape in our_shapes.items()}
    for name, rule, layer in tensor_plan(config, layout):
        for path, part in zip(rule.ours, rule.transform.to_ours(read(name))):
            if layer is None:
                out[path][...] = part
            else:
                out[path][layer] = part
    return out
