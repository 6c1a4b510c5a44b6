"""The training configuration: one YAML file plus `key=value` overrides (`artquant train CONFIG lr=1e-5`)."""

from __future__ import annotations

import dataclasses
import math
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
    score_range: list[float] | None = None  # the datasets' score scale when not 1..10, e.g. [0, 100]; rescaled
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


# The allowed span of each numeric setting: (lowest, highest), None for no bound. Every number must be finite.
BOUNDS = {
    "lora_r": (1, None), "lora_alpha": (0, None), "lora_dropout": (0, 1), "weight_desp": (0, None),
    "weight_next_token": (0, None), "weight_softkl": (0, None), "learning_rate": (0, None), "weight_decay": (0, None),
    "warmup_ratio": (0, 1), "max_grad_norm": (0, None), "epochs": (0, None), "max_steps": (0, None),
    "batch_size": (1, None), "gradient_accumulation_steps": (1, None), "max_length": (1, None),
    "num_workers": (0, None), "save_steps": (0, None), "save_total_limit": (0, None), "eval_steps": (0, None),
    "logging_steps": (1, None),
}
DATA_FORMATS = ("auto", "json", "csv", "jsonl")


def _check_bounds(name: str, value) -> None:
    low, high = BOUNDS[name]
    if not math.isfinite(value) or value < low or (high is not None and value > high):
        span = f"at least {low}" if high is None else f"between {low} and {high}"
        raise ConfigError(f"{name} must be {span}, got {value!r}.")


def _score_range(value, key: str) -> tuple[float, float] | None:
    if value is None:
        return None
    numbers = value if isinstance(value, (list, tuple)) else [value]
    if (len(numbers) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in numbers)
            or not all(math.isfinite(v) for v in numbers) or numbers[0] >= numbers[1]):
        raise ConfigError(f"{key} must be [lowest, highest] of the dataset's scores (e.g. [0, 100]), got {value!r}.")
    return float(numbers[0]), float(numbers[1])


def _dataset_spec(value, key: str) -> DatasetSpec:
    if isinstance(value, str):
        return DatasetSpec(path=value)
    if not isinstance(value, dict) or not isinstance(value.get("path"), str):
        raise ConfigError(f"{key}: each dataset is a path or a mapping with 'path' (and image_folder, weight, format, "
                          "score_range).")
    unknown = set(value) - {f.name for f in dataclasses.fields(DatasetSpec)}
    if unknown:
        raise ConfigError(f"{key}: unknown dataset keys {sorted(unknown)}.")
    spec = DatasetSpec(**value)
    weight = spec.weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise ConfigError(f"{key}: weight must be a number > 0, got {weight!r}.")
    if spec.format not in DATA_FORMATS:
        raise ConfigError(f"{key}: format must be one of {', '.join(DATA_FORMATS)}, got {spec.format!r}.")
    if not isinstance(spec.image_folder, str):
        raise ConfigError(f"{key}: image_folder must be a folder path, got {spec.image_folder!r}.")
    spec.score_range = _score_range(spec.score_range, f"{key}.score_range")
    return spec


def _convert(name: str, value, current):
    kind = type(current) if current is not None else None
    if name == "data":
        items = value if isinstance(value, list) else [value]
        return [_dataset_spec(v, f"data[{i}]") for i, v in enumerate(items)]
    if name == "eval_data":
        return None if value in (None, "", "none") else _dataset_spec(value, "eval_data")
    if name == "score_range":
        return _score_range(value, name)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{name} is true or false, got {value!r}.")
        return str(value).lower() in ("true", "1", "yes")
    if kind in (int, float):
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError
            number = float(value)
            if kind is int and not number.is_integer():
                raise ValueError
        except (OverflowError, ValueError):
            whole = "a whole number" if kind is int else "a number"
            raise ConfigError(f"{name} must be {whole}, got {value!r}.") from None
        converted = int(number) if kind is int and math.isfinite(number) else number
        if name in BOUNDS:
            _check_bounds(name, converted)
        return converted
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"{name} must be text, got {value!r}.")
    return value


def _yaml(text: str, where: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:  # syntax errors, and tags such as !!python/object that safe_load never builds
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(error).split())}. Only plain YAML values are "
                          "accepted (no !!python tags).") from None


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
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"config file {path} cannot be read as UTF-8 text ({error}).") from None
        values = _yaml(text, f"config file {path}") or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the config must be a YAML mapping of keys to values.")
        root = path.parent
    for override in overrides:
        key, sep, raw = override.removeprefix("--").partition("=")
        if not sep:
            raise ConfigError(f"override {override!r} must look like key=value.")
        values[key.replace("-", "_")] = _yaml(raw, f"override {override!r}")
    defaults = TrainingConfig()
    known = {f.name for f in dataclasses.fields(TrainingConfig)}
    unknown = sorted(map(str, set(values) - known))
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(known)}.")
    config = TrainingConfig(**{k: _convert(k, v, getattr(defaults, k)) for k, v in values.items()})
    if config.precision not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"precision must be bf16, fp16 or fp32, got {config.precision!r}.")
    if not config.max_steps and not config.epochs > 0:
        raise ConfigError("epochs must be > 0, or set max_steps to the number of optimizer steps.")
    from transformers import SchedulerType

    schedulers = [kind.value for kind in SchedulerType]
    if config.lr_scheduler not in schedulers:
        raise ConfigError(f"lr_scheduler must be one of {', '.join(schedulers)}, got {config.lr_scheduler!r}.")
    if not config.data:
        raise ConfigError("no training data: set `data` to a list of files (score JSON, description JSON, CSV, JSONL).")
    for spec in [*config.data, *([config.eval_data] if config.eval_data else [])]:
        spec.score_range = spec.score_range or config.score_range
        spec.path = str(root / spec.path)
        spec.image_folder = str(root / spec.image_folder) if spec.image_folder else ""
    config.output_dir = str(root / config.output_dir)
    if Path(root / config.base_model).exists():
        config.base_model = str(root / config.base_model)
    _refuse_other_families(config.base_model)
    return config


def _refuse_other_families(base_model: str) -> None:
    """Training is ArtQuant's RAD recipe on mPLUG-Owl2: a base of another family (a Q-ReAlign preset, its model id
    or a Qwen-VL checkpoint folder) is refused here, before any data or model is read."""
    import json

    from ..scorer.presets import PRESETS

    preset = next((p for p in PRESETS.values() if base_model in (p.name, p.model_id)), None)
    if preset is not None:
        kind = None if preset.family == "mplug_owl2" else f"a {preset.family} model (the {preset.name} preset's)"
    else:
        try:
            model_type = json.loads((Path(base_model) / "config.json").read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError):  # no such folder, or a broken file the loader explains
            model_type = "mplug_owl2"
        kind = None if model_type == "mplug_owl2" else f"a model of type {model_type!r}"
    if kind is not None:
        raise ConfigError(
            f"base_model {base_model} is {kind}; artquant train reproduces ArtQuant's RAD fine-tuning on mPLUG-Owl2 "
            "and trains nothing else. Set base_model to an mPLUG-Owl2 checkpoint (default "
            f"{TrainingConfig.base_model}); Q-ReAlign (Qwen-VL) models are fine-tuned with their authors' toolkit "
            "(github.com/Q-Future/Q-ReAlign).")
