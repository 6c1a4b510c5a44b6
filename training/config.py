"""The training configuration: one YAML file plus `key=value` overrides (`artquant train CONFIG lr=1e-5`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data import DatasetSpec
from .loss import LossWeights


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which key and what is allowed."""


@dataclass
class TrainingConfig:
    """Every knob of a run. Defaults are the reference's recipe (LoRA r 128 on q_proj / v_proj.multiway.1, the
    abstractor and the vision model trained fully, AdamW 2e-5 with a cosine schedule, bf16)."""

    base_model: str = "MAGAer13/mplug-owl2-llama2-7b"
    output_dir: str = "artquant-run"
    data: list[DatasetSpec] = field(default_factory=list)
    eval_data: DatasetSpec | None = None  # a held-out score file evaluated every `eval_steps`
    # LoRA and which modules train
    lora: bool = True
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    lora_target: str = r"model\.layers\.\d+\.self_attn\.(q_proj|v_proj\.multiway\.1)"
    tune_visual_abstractor: bool = True
    tune_vision_model: bool = True
    # loss
    weight_desp: float = LossWeights.description  # the paper's defaults live in one place, training/loss.py
    weight_next_token: float = LossWeights.next_token
    weight_softkl: float = LossWeights.softkl
    # optimisation
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides `epochs`
    batch_size: int = 4  # per device
    gradient_accumulation_steps: int = 1
    precision: str = "bf16"  # bf16 | fp16 | fp32
    gradient_checkpointing: bool = True
    max_length: int = 2048
    num_workers: int = 2
    seed: int = 42
    # checkpoints, evaluation, logging
    save_steps: int = 500
    save_total_limit: int = 2
    resume: bool = True  # continue from the newest checkpoint in output_dir
    eval_steps: int = 0
    logging_steps: int = 10
    reference_layout: bool = False  # also write non_lora_trainables.bin, for users of the reference code
    tensorboard: bool = True

    @property
    def loss_weights(self) -> LossWeights:
        return LossWeights(self.weight_desp, self.weight_next_token, self.weight_softkl)


def _dataset_spec(value, key: str) -> DatasetSpec:
    if isinstance(value, str):
        return DatasetSpec(path=value)
    if not isinstance(value, dict) or "path" not in value:
        raise ConfigError(f"{key}: each dataset is a path or a mapping with 'path' (and image_folder, weight, format).")
    unknown = set(value) - {f.name for f in dataclasses.fields(DatasetSpec)}
    if unknown:
        raise ConfigError(f"{key}: unknown dataset keys {sorted(unknown)}.")
    return DatasetSpec(**value)


def _convert(name: str, value, current):
    kind = type(current) if current is not None else None
    if name == "data":
        items = value if isinstance(value, list) else [value]
        return [_dataset_spec(v, f"data[{i}]") for i, v in enumerate(items)]
    if name == "eval_data":
        return None if value in (None, "", "none") else _dataset_spec(value, "eval_data")
    if kind is bool and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{name} is true or false, got {value!r}.")
        return value.lower() in ("true", "1", "yes")
    if kind in (int, float) and not isinstance(value, bool):
        try:
            return kind(float(value)) if kind is int and float(value).is_integer() else kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}.") from None
    return value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainingConfig:
    """YAML mapping (keys as in `TrainingConfig`) then `key=value` overrides (values parsed as YAML).

    Relative data and output paths in the file are taken relative to the file's folder.
    """
    values = {}
    root = Path(".")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist.")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the config must be a YAML mapping of keys to values.")
        root = path.parent
    for override in overrides:
        key, sep, raw = override.removeprefix("--").partition("=")
        if not sep:
            raise ConfigError(f"override {override!r} must look like key=value.")
        values[key.replace("-", "_")] = yaml.safe_load(raw)
    defaults = TrainingConfig()
    known = {f.name for f in dataclasses.fields(TrainingConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(known)}.")
    config = TrainingConfig(**{k: _convert(k, v, getattr(defaults, k)) for k, v in values.items()})
    if config.precision not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"precision must be bf16, fp16 or fp32, got {config.precision!r}.")
    if not config.data:
        raise ConfigError("no training data: set `data` to a list of files (score JSON, description JSON, CSV, JSONL).")
    for spec in [*config.data, *([config.eval_data] if config.eval_data else [])]:
        spec.path = str(root / spec.path)
        spec.image_folder = str(root / spec.image_folder) if spec.image_folder else ""
    config.output_dir = str(root / config.output_dir)
    if Path(root / config.base_model).exists():
        config.base_model = str(root / config.base_model)
    return config
