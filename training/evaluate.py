"""Evaluation of a scorer on images with human scores: SRCC, PLCC (raw and after the 4-parameter logistic fit),
MAE, MSE, level accuracy; a scatter plot and a histogram; a JSON report.

    artquant eval --model RELEASE --base BASE --data test.json --out eval/
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..scorer.levels import hard_label
from .data import DataError, DatasetSpec, read_dataset

logger = logging.getLogger(__name__)


def read_scored_images(spec: DatasetSpec) -> tuple[list[str], list[float]]:
    """Image paths and human scores of a score file (reference JSON with gt_score, CSV or JSONL)."""
    samples = [s for s in read_dataset(spec) if s.task_type == "score" and s.gt_score is not None]
    if not samples:
        raise DataError(f"{spec.path}: no score samples with a human score (gt_score / score column).")
    return [s.image for s in samples], [s.gt_score for s in samples]


def logistic_4(x, beta1, beta2, beta3, beta4):
    """VQEG's monotonic mapping used before PLCC: (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2."""
    from scipy.special import expit  # overflow-free 1 / (1 + exp(-t))

    return (beta1 - beta2) * expit((x - beta3) / abs(beta4)) + beta2


def fit_logistic(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Predictions mapped by the least-squares 4-parameter logistic (identity if the fit fails)."""
    from scipy.optimize import OptimizeWarning, curve_fit

    start = [truth.max(), truth.min(), predicted.mean(), predicted.std() / 4 or 1.0]
    try:
        with warnings.catch_warnings():  # an unestimable covariance is expected on flat predictions; it is unused
            warnings.simplefilter("ignore", OptimizeWarning)
            params, _ = curve_fit(logistic_4, predicted, truth, p0=start, maxfev=10000)
    except (RuntimeError, ValueError):
        return predicted
    return logistic_4(predicted, *params)


def score_metrics(predicted, truth) -> dict[str, float]:
    """[N] predicted and human scores -> srcc, plcc, plcc_logistic, krcc, mae, mse, level_accuracy, n."""
    from scipy.stats import kendalltau, pearsonr, spearmanr

    predicted, truth = np.asarray(predicted, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if len(predicted) < 3:
        raise ValueError(f"need at least 3 scored images for correlations, got {len(predicted)}.")
    constant = predicted.std() == 0 or truth.std() == 0
    return {
        "n": int(len(predicted)),
        "srcc": math.nan if constant else float(spearmanr(predicted, truth)[0]),
        "plcc": math.nan if constant else float(pearsonr(predicted, truth)[0]),
        "plcc_logistic": math.nan if constant else float(pearsonr(fit_logistic(predicted, truth), truth)[0]),
        "krcc": math.nan if constant else float(kendalltau(predicted, truth)[0]),
        "mae": float(np.abs(predicted - truth).mean()),
        "mse": float(((predicted - truth) ** 2).mean()),
        # The level word each score maps to under the training thresholds, predicted vs human.
        "level_accuracy": float(np.mean([hard_label(p) == hard_label(t) for p, t in zip(predicted, truth)])),
    }


def evaluate_scorer(scorer, images: list[str], scores: list[float], batch_size: int = 8, progress: bool = True) -> dict:
    """Scores `images` and compares them with `scores`. Unreadable images are left out and listed in the report."""
    with tqdm(total=len(images), desc="eval", disable=not progress) as bar:
        results = scorer.score(images, batch_size=batch_size, progress=bar.update)
    kept = [(r, t) for r, t in zip(results, scores) if r.ok]
    predicted = [r.score for r, _ in kept]
    truth = [t for _, t in kept]
    return {
        "metrics": score_metrics(predicted, truth),
        "failed": [{"image": r.source, "error": r.error} for r in results if not r.ok],
        "predictions": [{"image": r.source, "score": r.score, "std": r.std, "gt_score": t} for r, t in kept],
    }


def write_plots(report: dict, out: Path) -> list[Path]:
    """scatter.png (prediction vs human score) and histogram.png (both score distributions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    predicted = [p["score"] for p in report["predictions"]]
    truth = [p["gt_score"] for p in report["predictions"]]
    metrics = report["metrics"]
    figure, axes = plt.subplots(figsize=(5, 5))
    axes.scatter(truth, predicted, s=8, alpha=0.6)
    low, high = min(truth + predicted), max(truth + predicted)
    axes.plot([low, high], [low, high], color="grey", linewidth=1)
    axes.set(xlabel="human score", ylabel="predicted score",
             title=f"SRCC {metrics['srcc']:.3f}  PLCC {metrics['plcc']:.3f}  (n={metrics['n']})")
    figure.tight_layout()
    figure.savefig(out / "scatter.png", dpi=120)
    plt.close(figure)
    figure, axes = plt.subplots(figsize=(6, 4))
    bins = np.linspace(low, high, 30)
    axes.hist(truth, bins=bins, alpha=0.5, label="human")
    axes.hist(predicted, bins=bins, alpha=0.5, label="predicted")
    axes.set(xlabel="score", ylabel="images")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out / "histogram.png", dpi=120)
    plt.close(figure)
    return [out / "scatter.png", out / "histogram.png"]


def scorer_for_network(network, checkpoint, device, preset: str = "artquant"):
    """An `ArtQuantScorer` around a model being trained (its weights are shared, not copied)."""
    from ..scorer.checkpoint import LoadedCheckpoint
    from ..scorer.presets import get_preset
    from ..scorer.scoring import ArtQuantScorer

    loaded = LoadedCheckpoint(network, checkpoint.tokenizer, checkpoint.image_config, "training")
    dtype = network.get_input_embeddings().weight.dtype
    return ArtQuantScorer(loaded, get_preset(preset), device, dtype)


def run_evaluation(
    model: str,
    data: str,
    base: str | None = None,
    out: str = "artquant-eval",
    image_folder: str = "",
    batch_size: int = 8,
    preset: str = "artquant",
    device: str | None = None,
    dtype: str | None = None,
    plots: bool = True,
) -> int:
    """`artquant eval`: writes report.json (metrics, failures, per-image predictions) and the plots into `out`.
    Returns 0, or 2 when the data cannot be used (the message is printed)."""
    from ..scorer.scoring import ArtQuantScorer

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        images, scores = read_scored_images(DatasetSpec(path=data, image_folder=image_folder))
    except DataError as error:
        logger.error("%s", error)
        return 2
    scorer = ArtQuantScorer.from_pretrained(model, base=base, preset=preset, device=device, dtype=dtype)
    report = evaluate_scorer(scorer, images, scores, batch_size=batch_size)
    report["model"], report["data"] = str(model), str(data)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    if plots:
        write_plots(report, folder)
    print(json.dumps(report["metrics"], indent=2))
    print(f"Report written to {folder / 'report.json'}")
    return 0
