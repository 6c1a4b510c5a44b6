"""RAD-based fine-tuning of the ArtQuant scorer (peft LoRA + accelerate) and its evaluation.

`run_training(config_path, overrides)` and `run_evaluation(model, data, ...)` are what `artquant train` and
`artquant eval` call; importing this package stays cheap (torch, peft and accelerate load on first use).
"""

from importlib import import_module

_PUBLIC = {
    "run_training": ".trainer",
    "train": ".trainer",
    "save_release": ".trainer",
    "run_evaluation": ".evaluate",
    "score_metrics": ".evaluate",
    "TrainingConfig": ".config",
    "load_config": ".config",
    "ArtQuantLoss": ".loss",
    "LossWeights": ".loss",
}

__all__ = list(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
