"""PhiConfig: presets, the three config.json dialects, and refusals (message text, not just type)."""

import json
import logging
from pathlib import Path

import pytest

from phi2_jax import ConfigError, PhiConfig, preset
from phi2_jax.config import PRESETS

PHI2_4X_CONFIG = {  # microsoft/phi-2 config.json as published (transformers 4.37)
    "_name_or_path": "microsoft/phi-2", "architectures": ["PhiForCausalLM"], "attention_dropout": 0.0,
    "bos_token_id": 50256, "embd_pdrop": 0.0, "eos_token_id": 50256, "hidden_act": "gelu_new",
    "hidden_size": 2560, "initializer_range": 0.02, "intermediate_size": 10240, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048, "model_type": "phi", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "partial_rotary_factor": 0.4, "qk_layernorm": False, "resid_pdrop": 0.1,
    "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.37.0", "use_cache": True, "vocab_size": 51200,
}

PHI2_MSFT_CONFIG = {  # the first phi-2 upload
    "_name_or_path": "microsoft/phi-2", "activation_function": "gelu_new", "architectures": ["PhiForCausalLM"],
    "attn_pdrop": 0.0, "auto_map": {"AutoConfig": "configuration_phi.PhiConfig"}, "embd_pdrop": 0.0,
    "flash_attn": False, "flash_rotary": False, "fused_dense": False, "img_processor": None,
    "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "phi-msft", "n_embd": 2560,
    "n_head": 32, "n_head_kv": None, "n_inner": None, "n_layer": 32, "n_positions": 2048, "resid_pdrop": 0.1,
    "rotary_dim": 32, "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.35.2",
    "vocab_size": 51200,
}


def test_phi2_preset_is_the_published_model():
    c = preset("phi-2")
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (51200, 2560, 10240, 32)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rotary_dim) == (32, 32, 80, 32)
    assert (c.rope_theta, c.layer_norm_eps, c.hidden_act, c.max_position_embeddings) == (10000.0, 1e-5, "gelu_new", 2048)
    assert (c.resid_pdrop, c.embd_pdrop, c.attention_dropout, c.qk_layernorm) == (0.1, 0.0, 0.0, False)
    assert (c.bos_token_id, c.eos_token_id) == (50256, 50256)
    assert c.num_params() == 2_779_683_840


@pytest.mark.parametrize("name", ["tiny", "nano", "phi-small"])
def test_tiny_presets_are_small(name):
    assert PRESETS[name].num_params() < 40_000_000


def test_all_three_dialects_read_as_phi2():
    v4 = PhiConfig.from_hf_dict(PHI2_4X_CONFIG)
    v5_dict = {k: v for k, v in PHI2_4X_CONFIG.items() if k not in ("rope_theta", "partial_rotary_factor", "rope_scaling")}
    v5_dict["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.4}
    v5 = PhiConfig.from_hf_dict(v5_dict)
    msft = PhiConfig.from_hf_dict(PHI2_MSFT_CONFIG)
    assert v4 == v5 == msft == preset("phi-2")


def test_to_hf_dict_reads_back_identically():
    config = preset("tiny", qk_layernorm=True, num_key_value_heads=2)
    assert PhiConfig.from_hf_dict(config.to_hf_dict()) == config


def test_transformers_reads_our_config_json(tmp_path):
    from transformers import PhiConfig as HFPhiConfig
    config = preset("phi-2")
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    hf = HFPhiConfig.from_pretrained(tmp_path)
    assert hf.rope_parameters["partial_rotary_factor"] == 0.4 and hf.hidden_size == 2560


REFUSALS = [
    (dict(hidden_size=30, num_attention_heads=4),
     "hidden_size 30 is not divisible by num_attention_heads 4; expected a multiple"),
    (dict(hidden_size=40, num_attention_heads=4, partial_rotary_factor=0.3),
     "partial_rotary_factor 0.3 gives rotary dimension 3 of head_dim 10; expected an even"),
    (dict(hidden_act="swish9"), "hidden_act 'swish9' is not supported; expected one of gelu_new"),
    (dict(num_attention_heads=32, num_key_value_heads=5), "num_attention_heads 32 is not divisible by num_key_value_heads 5"),
    (dict(resid_pdrop=1.5), "resid_pdrop must be a probability in [0, 1), got 1.5."),
    (dict(remat="sometimes"), "remat 'sometimes' is not a policy; expected one of none, full, save_dots."),
    (dict(vocab_size=0), "vocab_size must be a positive integer, got 0."),
]


@pytest.mark.parametrize("changes,message", REFUSALS)
def test_invalid_configs_are_refused_with_a_sentence(changes, message):
    with pytest.raises(ConfigError) as error:
        preset("phi-2", **changes)
    assert message in str(error.value)


def test_unknown_field_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown model config field 'hiden_size'\. Did you mean 'hidden_size'\?"):
        PhiConfig.from_dict({"hiden_size": 64})
    with pytest.raises(ConfigError, match=r"config.json has unknown field 'num_hiden_layers'\. Did you mean 'num_hidden_layers'\?"):
        PhiConfig.from_hf_dict({**PHI2_4X_CONFIG, "num_hiden_layers": 2})


def test_hf_files_with_odd_rotary_or_bad_type_are_refused(tmp_path):
    odd = {**PHI2_4X_CONFIG, "hidden_size": 40, "num_attention_heads": 4, "num_key_value_heads": 4,
           "partial_rotary_factor": 0.5}
    with pytest.raises(ConfigError, match="rotary dimension 5 of head_dim 10"):
        PhiConfig.from_hf_dict(odd)
    with pytest.raises(ConfigError, match=r"has model_type 'llama'; expected 'phi'"):
        PhiConfig.from_hf_dict({**PHI2_4X_CONFIG, "model_type": "llama"})
    with pytest.raises(ConfigError, match="asks for rope scaling"):
        PhiConfig.from_hf_dict({**PHI2_4X_CONFIG, "rope_scaling": {"type": "linear", "factor": 2.0}})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json is not valid JSON"):
        PhiConfig.from_hf_file(tmp_path)


def test_unknown_preset_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"unknown model preset 'phi2'.*Did you mean 'phi-2'\?"):
        preset("phi2")


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path, caplog):
    """What `python -m phi2_jax.train configs/X.yaml` checks before any compute, for each shipped file
    (the architecture of its init_from is the preset's here: the model folder is the user's)."""
    from phi2_jax.training.run_config import load_run_config, validate

    config = load_run_config(path)
    with caplog.at_level(logging.WARNING):
        validate(config, 8)
    assert config.train.objective in ("lm", "sft", "dpo", "grpo")
    assert "does not read" not in caplog.text  # no setting another objective reads


def test_settings_another_objective_reads_are_named_once(caplog):
    """A config shared between an SFT and a DPO stage keeps dpo.* in the SFT run: said, not refused."""
    from phi2_jax.training.run_config import load_run_config, validate

    config = load_run_config(None, ["train.objective=sft", "checkpoint.init_from=somewhere", "dpo.beta=0.5",
                                    "grpo.num_generations=4", "sft.count_prompt=true"])
    with caplog.at_level(logging.WARNING):
        validate(config, 1)
    assert caplog.messages == ["dpo.beta, grpo.num_generations are set, but train.objective is sft, which does not "
                               "read them"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        validate(load_run_config(None, ["data.chat_template=x.jinja"]), 1)
    assert caplog.messages == ["data.chat_template is set, but train.objective is lm, which does not read it"]
