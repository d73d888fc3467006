"""Reference models: transformers' PhiForCausalLM with random weights, saved as a user would find them.

Written independently of phi2_jax's own name table: the phi-msft folder is
produced here from the published key names, so a mistake in our table cannot
be mirrored into the files it is tested against.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import PhiConfig, PhiForCausalLM


def random_phi(seed: int = 0, **config) -> PhiForCausalLM:
    """PhiForCausalLM with weights large enough that attention is far from uniform."""
    torch.manual_seed(seed)
    model = PhiForCausalLM(PhiConfig(**config)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.2)
    return model


def write_hf_folder(folder: Path, *, dialect: str = "5.x", layout: str = "transformers", seed: int = 0,
                    max_shard_size: str | None = None, **config):
    """Saves a random PhiForCausalLM to `folder` in the given config dialect / weight layout; returns (folder, model)."""
    model = random_phi(seed, **config)
    if layout == "transformers":
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(folder, **kwargs)
        if dialect == "4.x":
            _rewrite_as_4x(folder / "config.json")
    elif layout == "phi-msft":
        assert dialect == "msft"
        _write_msft(folder, model)
    else:
        raise ValueError(layout)
    return folder, model


def _rewrite_as_4x(path: Path) -> None:
    hf = json.loads(path.read_text())
    rope = hf.pop("rope_parameters")
    hf.pop("dtype", None)
    hf.update(rope_theta=rope["rope_theta"], partial_rotary_factor=rope["partial_rotary_factor"],
              rope_scaling=None, torch_dtype="float32", transformers_version="4.37.0")
    path.write_text(json.dumps(hf, indent=2))


def _write_msft(folder: Path, model: PhiForCausalLM) -> None:
    """The first phi-2 upload's names: fused Wqkv (Q rows, then K, then V), mixer.out_proj, lm_head.ln/linear."""
    cfg = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {"transformer.embd.wte.weight": sd["model.embed_tokens.weight"]}
    for i in range(cfg.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        for part in ("weight", "bias"):
            out[dst + f"ln.{part}"] = sd[src + f"input_layernorm.{part}"]
            out[dst + f"mixer.Wqkv.{part}"] = torch.cat([sd[src + f"self_attn.{p}_proj.{part}"] for p in "qkv"], 0)
            out[dst + f"mixer.out_proj.{part}"] = sd[src + f"self_attn.dense.{part}"]
            out[dst + f"mlp.fc1.{part}"] = sd[src + f"mlp.fc1.{part}"]
            out[dst + f"mlp.fc2.{part}"] = sd[src + f"mlp.fc2.{part}"]
    for part in ("weight", "bias"):
        out[f"lm_head.ln.{part}"] = sd[f"model.final_layernorm.{part}"]
        out[f"lm_head.linear.{part}"] = sd[f"lm_head.{part}"]
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    msft = {
        "_name_or_path": "microsoft/phi-2", "architectures": ["PhiForCausalLM"], "model_type": "phi-msft",
        "activation_function": cfg.hidden_act, "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.1,
        "flash_attn": False, "flash_rotary": False, "fused_dense": False, "img_processor": None,
        "initializer_range": 0.02, "layer_norm_epsilon": cfg.layer_norm_eps, "n_embd": cfg.hidden_size,
        "n_head": cfg.num_attention_heads, "n_head_kv": None, "n_inner": cfg.intermediate_size,
        "n_layer": cfg.num_hidden_layers, "n_positions": cfg.max_position_embeddings,
        "rotary_dim": int(head_dim * cfg.rope_parameters["partial_rotary_factor"]),
        "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.35.2",
        "vocab_size": cfg.vocab_size,
        "auto_map": {"AutoConfig": "configuration_phi.PhiConfig", "AutoModelForCausalLM": "modeling_phi.PhiForCausalLM"},
    }
    (folder / "config.json").write_text(json.dumps(msft, indent=2))


def reference_logits(model: PhiForCausalLM, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        mask = None if attention_mask is None else torch.tensor(attention_mask)
        return model(torch.tensor(input_ids), attention_mask=mask).logits.float().numpy()


def train_bpe_tokenizer(texts: list[str], vocab_size: int, folder: Path) -> Path:
    """A byte-level BPE `tokenizer.json` (the kind Phi-2 ships) trained on `texts`, saved in `folder`."""
    from phi2_jax.data.tokenizer import train_byte_level_bpe

    return train_byte_level_bpe(texts, vocab_size, folder)
