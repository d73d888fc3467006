"""Training run configuration: YAML files in `configs/` plus `section.key=value` overrides.

Every section is a typed dataclass. Unknown keys are refused with a suggestion
for the likely misspelling, values are checked against the field's type, and
combinations that cannot work are refused by `validate` before any compute.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from phi2_jax.config import PRESETS, PhiConfig, preset
from phi2_jax.sharding import MeshConfig
from phi2_jax.errors import ConfigError, did_you_mean

log = logging.getLogger(__name__)

@dataclasses.dataclass
class ModelSection:
    preset: str = "tiny"
    # Any PhiConfig field overrides the preset (e.g. num_hidden_layers, remat, compute_dtype).
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class DataSection:
    # Each source: {path: "stdlib" | glob, format: auto|text|jsonl|parquet|tokens, weight: 1.0, field: "text"};
    # tokens: .uint16/.int32 files (python -m phi2_jax.pretokenize) or .npy token-id arrays made with data.tokenizer,
    # EOS after each document; split: train|validation.
    sources: list[dict[str, Any]] = dataclasses.field(default_factory=lambda: [{"path": "stdlib"}])
    tokenizer: str = "auto"  # "auto": sentencepiece trained on the training split; or tokenizer.json / .model
    seq_len: int = 256
    val_fraction: float = 0.05  # documents held out (chosen by a hash of their name)
    shuffle_seed: int = 0
    workers: int = 0  # >0: Grain worker processes; 0: a prefetch thread
    max_documents: int = 0  # 0 = all; a cap for quick runs
    # Post-training (train.objective sft | dpo): the record fields each TRL convention reads, renamed to match
    # your files (text, prompt, completion, messages, chosen, rejected), and the chat template: "" = the one
    # checkpoint.init_from carries (a run's chat_template.jinja), else the tokenizer folder's (chat_template.jinja
    # or tokenizer_config.json), else Phi-2's built-in QA template;
    # or a .jinja file / a folder holding one (GRPO renders conversational prompts with it).
    fields: dict[str, str] = dataclasses.field(default_factory=dict)
    chat_template: str = ""


@dataclasses.dataclass
class OptimSection:
    lr: float = 3e-3
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    z_loss: float = 0.0


@dataclasses.dataclass
class TrainSection:
    steps: int = 300
    batch_size: int = 16  # global, in sequences
    grad_accum: int = 1
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    seed: int = 0
    samples: bool = True  # print completions of a few Python prompts at the end
    # lm (pre-training on text) | sft (instruction tuning) | dpo (preference pairs) | grpo (RL, verifiable rewards)
    objective: str = "lm"


@dataclasses.dataclass
class SFTSection:
    # TRL's completion_only_loss / assistant_only_loss: only completion (assistant) tokens count in the loss.
    # true: every token of the example counts, the prompt's too.
    count_prompt: bool = False


@dataclasses.dataclass
class DPOSection:
    # As TRL's DPOConfig names them.
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge | robust
    label_smoothing: float = 0.0  # robust only


@dataclasses.dataclass
class GRPOSection:
    # Prompts: data.sources' files read as `task` (gsm8k | mbpp | humaneval task files, or jsonl: a prompt-only
    # file with prompt_field, as text or a list of messages, and answer_field). train.batch_size counts
    # completions: batch_size / num_generations prompts per step. One step = one rollout batch and
    # num_iterations optimiser updates on it.
    task: str = "jsonl"
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    num_generations: int = 8
    max_prompt_length: int = 256  # longer prompts are dropped (counted in the log)
    max_completion_length: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    # As TRL's GRPOConfig names them.
    beta: float = 0.0  # KL penalty to the reference (LoRA: adapters off; else a frozen copy of the start)
    epsilon: float = 0.2
    epsilon_high: float = 0.0  # 0: epsilon (clip symmetric)
    loss_type: str = "grpo"  # grpo | bnpo | dr_grpo
    scale_rewards: str = "group"  # group | batch | none (Dr. GRPO: no std scaling)
    num_iterations: int = 1
    mask_truncated_completions: bool = False
    bias_correction_kl: bool = True  # TRL 1.16's use_bias_correction_kl
    # Built-ins math_answer, code_tests, {name: format_regex, pattern: ...}, or 'module:function'; weights.
    rewards: list[Any] = dataclasses.field(default_factory=lambda: [{"name": "math_answer", "weight": 1.0}])
    reward_timeout: float = 300.0  # seconds per reward function and batch; past it the function scores 0


@dataclasses.dataclass
class CheckpointSection:
    every: int = 100
    keep: int = 3
    init_from: str = ""  # a Hugging Face folder, a converted checkpoint or a run folder
    async_save: bool = True
    # Start at step 0 in a run_dir that holds checkpoints: the old run's checkpoints and logs are moved
    # to run_dir/replaced-<time>/ first (never deleted). Without it such a run_dir is resumed or refused.
    restart: bool = False


@dataclasses.dataclass
class DistributedSection:
    coordinator: str = ""  # host:port; empty = auto-detect (SLURM, Open MPI, Kubernetes) or single process
    num_processes: int = 0
    process_id: int = -1


@dataclasses.dataclass
class RunConfig:
    run_dir: str = "runs/tiny"
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    sft: SFTSection = dataclasses.field(default_factory=SFTSection)
    dpo: DPOSection = dataclasses.field(default_factory=DPOSection)
    grpo: GRPOSection = dataclasses.field(default_factory=GRPOSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedSection = dataclasses.field(default_factory=DistributedSection)

    def model_config(self) -> PhiConfig:
        return preset(self.model.preset, **self.model.overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Coerces ints to floats where a float is expected; refuses anything else of the wrong type."""
    hint = annotation if not isinstance(annotation, str) else eval(annotation, {**typing.__dict__, "Any": Any})
    origin = typing.get_origin(hint) or hint
    if hint is Any:
        return value
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is float and isinstance(value, str):
        try:  # YAML 1.1 reads '3e-3' (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if origin in (types.UnionType, typing.Union):
        return value
    if not isinstance(value, origin) or (origin is int and isinstance(value, bool)):
        raise ConfigError(f"{where} must be {origin.__name__}, got {value!r} ({type(value).__name__}).")
    return value


def _apply(section: Any, values: dict[str, Any], prefix: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(section)}
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key '{where}'.{did_you_mean(key, fields)}")
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where} must be a section (a mapping), got {value!r}.")
            _apply(current, value, f"{where}.")
        else:
            setattr(section, key, _check_type(value, fields[key].type, where))


def _model_values(values: dict[str, Any]) -> dict[str, Any]:
    """In YAML, model fields sit flat beside `preset`; split them into `overrides`."""
    values = dict(values)
    overrides = dict(values.pop("overrides", {}) or {})
    for key in list(values):
        if key != "preset":
            overrides[key] = values.pop(key)
    for key in overrides:
        if key not in {f.name for f in dataclasses.fields(PhiConfig)}:
            raise ConfigError(f"unknown config key 'model.{key}'.{did_you_mean(key, [f.name for f in dataclasses.fields(PhiConfig)])}")
    return {**values, "overrides": overrides}


def _yaml_problem(error: yaml.YAMLError) -> str:
    """'line 4, column 7: mapping values are not allowed here' from PyYAML's multi-line report."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def load_run_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """The run config from a YAML file (or the defaults: tiny model on the standard library) plus overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path} does not exist; expected a YAML run config such as configs/tiny.yaml.")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(error)}.") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}.")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value.")
        dotted, text = item.split("=", 1)
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section.")
        try:
            node[leaf] = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({_yaml_problem(error)}).") from None
    if "model" in raw:
        if not isinstance(raw["model"], dict):
            raise ConfigError(f"model must be a section (a mapping), got {raw['model']!r}.")
        raw["model"] = _model_values(raw["model"])
    config = RunConfig()
    _apply(config, raw, "")
    return config


def validate(config: RunConfig, num_devices: int, model: PhiConfig | None = None) -> PhiConfig:
    """Refuses impossible combinations before any compute; returns the model config.

    `model` is the config of `checkpoint.init_from` when fine-tuning; otherwise the preset's is used.
    """
    if config.model.preset not in PRESETS:
        raise ConfigError(f"model.preset '{config.model.preset}' is unknown; expected one of {', '.join(PRESETS)}."
                          f"{did_you_mean(config.model.preset, PRESETS)}")
    model = model or config.model_config()

    data, fsdp, _ = config.mesh.resolve(num_devices)
    t, d, o = config.train, config.data, config.optim
    for name, value in (("train.steps", t.steps), ("train.batch_size", t.batch_size), ("train.grad_accum", t.grad_accum),
                        ("train.log_every", t.log_every), ("train.eval_every", t.eval_every),
                        ("data.seq_len", d.seq_len), ("checkpoint.every", config.checkpoint.every),
                        ("checkpoint.keep", config.checkpoint.keep)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}.")
    for name, value in (("train.eval_batches", t.eval_batches), ("data.max_documents", d.max_documents),
                        ("data.workers", d.workers), ("optim.warmup_steps", o.warmup_steps)):
        if value < 0:
            raise ConfigError(f"{name} must be 0 or more, got {value}.")
    for name, value in (("optim.lr", o.lr), ("optim.clip_norm", o.clip_norm), ("optim.weight_decay", o.weight_decay),
                        ("optim.eps", o.eps), ("optim.z_loss", o.z_loss), ("optim.min_lr_ratio", o.min_lr_ratio)):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{name} must be a finite number, 0 or more, got {value}.")
    for name, value in (("optim.b1", o.b1), ("optim.b2", o.b2)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {value}.")
    _check_sources(d.sources)
    for name, value in (("run_dir", config.run_dir), ("checkpoint.init_from", config.checkpoint.init_from)):
        if "://" in value:
            raise ConfigError(f"{name} {value} is a URL; the trainer reads and writes local (or mounted) folders "
                              f"only: mount the bucket (e.g. with gcsfuse or s3fs) and give the mounted path.")
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.batch_size {t.batch_size} is not divisible by train.grad_accum {t.grad_accum}.")
    micro = t.batch_size // t.grad_accum
    if micro % (data * fsdp):
        raise ConfigError(f"the micro-batch of {micro} sequences (train.batch_size / train.grad_accum) is not divisible "
                          f"by the {data * fsdp}-way data parallelism (mesh.data x mesh.fsdp = {data} x {fsdp}).")
    if d.seq_len > model.max_position_embeddings:
        raise ConfigError(f"data.seq_len {d.seq_len} exceeds the model's max_position_embeddings "
                          f"{model.max_position_embeddings}.")
    if config.optim.schedule not in ("cosine", "linear", "constant"):
        raise ConfigError(f"optim.schedule '{config.optim.schedule}' is unknown; expected cosine, linear or constant.")
    if o.warmup_steps >= t.steps and t.steps > 1:
        # A short run (a smoke test, `launch/local.sh 2 train.steps=20`) keeps the default warmup of 20 steps:
        # warm up over a tenth of the run instead, said, and recorded as such in config.json.
        clipped = t.steps // 10
        log.warning("optim.warmup_steps %d is not below train.steps %d; warming up over %d steps (a tenth of the "
                    "run) instead", o.warmup_steps, t.steps, clipped)
        o.warmup_steps = clipped
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {d.val_fraction}.")
    _check_objective(config)
    g = config.grpo
    if t.objective == "grpo" and row_length(config) > model.max_position_embeddings:
        raise ConfigError(f"grpo.max_prompt_length {g.max_prompt_length} + grpo.max_completion_length "
                          f"{g.max_completion_length} exceeds the model's max_position_embeddings "
                          f"{model.max_position_embeddings}.")
    return model


def row_length(config: RunConfig) -> int:
    """Tokens per batch row: data.seq_len, or for GRPO a rollout row (grpo.max_prompt_length +
    grpo.max_completion_length, a fixed length so that the step compiles once)."""
    g = config.grpo
    return g.max_prompt_length + g.max_completion_length if config.train.objective == "grpo" else config.data.seq_len


def objective_options(config: RunConfig) -> dict:
    """The train step's options for train.objective (training/objectives.py, training/grpo.py)."""
    if config.train.objective == "dpo":
        d = config.dpo
        return {"beta": d.beta, "loss_type": d.loss_type, "label_smoothing": d.label_smoothing}
    if config.train.objective == "grpo":
        g = config.grpo
        return {"beta": g.beta, "epsilon_low": g.epsilon, "epsilon_high": g.epsilon_high or g.epsilon,
                "loss_type": g.loss_type, "max_completion_length": g.max_completion_length,
                "temperature": g.temperature, "bias_correction_kl": g.bias_correction_kl}
    return {}


OBJECTIVES = ("lm", "sft", "dpo", "grpo")


def _check_objective(config: RunConfig) -> None:
    """train.objective and its section; post-training needs a model to start from and a real tokenizer."""
    t = config.train
    if t.objective not in OBJECTIVES:
        raise ConfigError(f"train.objective '{t.objective}' is unknown; expected one of {', '.join(OBJECTIVES)}."
                          f"{did_you_mean(t.objective, OBJECTIVES)}")
    from phi2_jax.data.formats import FieldNames

    names = {f.name for f in dataclasses.fields(FieldNames)}
    for key, value in config.data.fields.items():
        if key not in names:
            raise ConfigError(f"data.fields has unknown key '{key}'; expected some of {', '.join(sorted(names))}."
                              f"{did_you_mean(key, names)}")
        if not isinstance(value, str) or not value:
            raise ConfigError(f"data.fields.{key} is {value!r}; expected the name of a record field.")
    if t.objective == "dpo":
        from phi2_jax.training.objectives import check_dpo_options

        check_dpo_options(config.dpo.loss_type, config.dpo.beta, config.dpo.label_smoothing)
    if t.objective == "grpo":
        from phi2_jax.training.grpo import check_grpo_options

        g = config.grpo
        check_grpo_options(num_generations=g.num_generations, beta=g.beta, epsilon=g.epsilon,
                           epsilon_high=g.epsilon_high or None, loss_type=g.loss_type, scale_rewards=g.scale_rewards,
                           max_completion_length=g.max_completion_length, temperature=g.temperature, top_p=g.top_p,
                           batch_size=t.batch_size)
        if g.num_iterations < 1:
            raise ConfigError(f"grpo.num_iterations is {g.num_iterations}; expected 1 or more optimiser passes "
                              f"per rollout batch.")
        if g.max_prompt_length < 1:
            raise ConfigError(f"grpo.max_prompt_length is {g.max_prompt_length}; expected a positive number of tokens.")
        if config.data.fields:  # read by SFT and DPO only: silently ignored here before
            raise ConfigError(f"data.fields {config.data.fields} renames SFT and DPO record fields; GRPO prompt files "
                              f"name theirs with grpo.prompt_field and grpo.answer_field (grpo.task jsonl).")
    _warn_unused_sections(config)
    if t.objective != "lm" and any(s.get("format") == "tokens" for s in config.data.sources):
        raise ConfigError(f"train.objective {t.objective} reads records (JSONL or Parquet), not token files; "
                          f"expected data.sources of .jsonl or .parquet files.")


def _warn_unused_sections(config: RunConfig) -> None:
    """Names settings that another objective reads (a `dpo.beta` in an SFT run), once: a config shared between
    stages keeps them, so they are said rather than refused."""
    t = config.train
    changed = []
    for name in ("sft", "dpo", "grpo"):
        section = getattr(config, name)
        defaults = dataclasses.asdict(type(section)())
        changed += [f"{name}.{key}" for key, value in dataclasses.asdict(section).items() if value != defaults[key]]
    changed += [f"data.{key}" for key in ("fields", "chat_template") if getattr(config.data, key)]
    unused = [key for key in changed if ignored_by(t.objective, key)]
    if unused:
        log.warning("%s %s set, but train.objective is %s, which does not read %s", ", ".join(unused),
                    "is" if len(unused) == 1 else "are", t.objective, "it" if len(unused) == 1 else "them")


def ignored_by(objective: str, key: str) -> bool:
    """Whether a run of train.objective `objective` never reads setting `key` (a dotted name, as 'dpo.beta' or
    'data.fields.prompt'): another objective's section, or in an LM run the post-training records' field names
    and chat template (GRPO refuses data.fields)."""
    section = key.split(".")[0]
    if section in ("sft", "dpo", "grpo"):
        return section != objective
    return objective == "lm" and any(key == k or key.startswith(k + ".") for k in ("data.fields", "data.chat_template"))


def _check_sources(sources: Any) -> None:
    """data.sources: a list of mappings, each with a path and, if given, a positive finite weight."""
    if not isinstance(sources, list) or not sources:
        raise ConfigError(f"data.sources must be a non-empty list of sources, got {sources!r}.")
    for i, source in enumerate(sources):
        if not isinstance(source, dict) or "path" not in source:
            raise ConfigError(f"data.sources[{i}] must be a mapping with a 'path', got {source!r}.")
        weight = source.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (math.isfinite(weight) and weight > 0):
            raise ConfigError(f"data.sources[{i}].weight must be a positive number, got {weight!r}.")
