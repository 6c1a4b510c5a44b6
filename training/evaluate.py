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
from ..scorer.presets import ARTQUANT, Preset, get_preset
from .data import SCORE_SCALE, DataError, DatasetSpec, read_samples

logger = logging.getLogger(__name__)


def read_scored_images(spec: DatasetSpec) -> tuple[list[str], list[float], list[dict]]:
    """(image paths, human scores, unusable records as {"image", "error"}) of a score file: a JSON list of
    {"image", "gt_score"} (conversations optional), CSV or JSONL. Description records are left out."""
    samples, problems = read_samples(spec)
    scored = [s for s in samples if s.task_type == "score" and s.gt_score is not None]
    if not scored and not problems:
        raise DataError(f"{spec.path}: no records with a human score (gt_score / score column).")
    failed = [{"image": p["image"], "error": p["error"]} for p in problems]
    return [s.image for s in scored], [s.gt_score for s in scored], failed


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


CORRELATIONS = ("srcc", "plcc", "plcc_logistic", "krcc")


def why_undefined(predicted, truth) -> str | None:
    """Why some metrics of these [N] predicted and human scores are undefined (None when every metric is defined)."""
    predicted, truth = np.asarray(predicted, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if len(predicted) == 0:
        return "no image was scored"
    if len(predicted) < 3:
        return f"correlations need at least 3 scored images, got {len(predicted)}"
    if truth.std() == 0 or predicted.std() == 0:
        return f"correlations are undefined: all {'human' if truth.std() == 0 else 'predicted'} scores are equal"
    return None


def score_metrics(predicted, truth, preset: Preset = ARTQUANT) -> dict:
    """[N] predicted and human scores, both on `preset`'s scale -> n, srcc, plcc, plcc_logistic, krcc, mae, mse,
    level_accuracy (the level word of each score: at most a level's weight and above the next lower one's, as
    ArtQuant's training answers).

    A metric that is undefined for these scores (correlations of fewer than 3 images or of constant scores,
    anything of no image) is None; `why_undefined` says why."""
    from scipy.stats import kendalltau, pearsonr, spearmanr

    predicted, truth = np.asarray(predicted, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    n = len(predicted)
    metrics = {"n": n, **dict.fromkeys(CORRELATIONS), "mae": None, "mse": None, "level_accuracy": None}
    thresholds = sorted(preset.level_weights)[:-1]  # ArtQuant's (1, 3.5, 5, 7.5); Q-ReAlign's (0, 0.25, 0.5, 0.75)

    def label(score: float) -> str:
        return hard_label(score, preset.level_names, thresholds)

    if n == 0:
        return metrics
    metrics.update(
        mae=float(np.abs(predicted - truth).mean()),
        mse=float(((predicted - truth) ** 2).mean()),
        # The level word each score maps to under the training thresholds, predicted vs human.
        level_accuracy=float(np.mean([label(p) == label(t) for p, t in zip(predicted, truth)])),
    )
    if why_undefined(predicted, truth) is None:
        metrics.update(
            srcc=float(spearmanr(predicted, truth)[0]),
            plcc=float(pearsonr(predicted, truth)[0]),
            plcc_logistic=float(pearsonr(fit_logistic(predicted, truth), truth)[0]),
            krcc=float(kendalltau(predicted, truth)[0]),
        )
    return metrics


def evaluate_scorer(scorer, images: list[str], scores: list[float], batch_size: int = 8, progress: bool = True) -> dict:
    """Scores `images` and compares them with `scores` (on the scorer's preset's scale) -> {"metrics", "undefined"
    (why some metrics are None, or None), "failed", "predictions"}. Unreadable images are left out and listed in
    "failed"."""
    results = []
    if images:
        with tqdm(total=len(images), desc="eval", disable=not progress) as bar:
            results = scorer.score(images, batch_size=batch_size, progress=bar.update)
    usable = [r.ok and math.isfinite(r.score) for r in results]  # a NaN score is a failure, whoever reports it
    kept = [(r, t) for r, t, ok in zip(results, scores, usable) if ok]
    predicted, truth = [r.score for r, _ in kept], [t for _, t in kept]
    return {
        "metrics": score_metrics(predicted, truth, scorer.preset),
        "undefined": why_undefined(predicted, truth),
        "failed": [{"image": str(r.source), "error": r.error or f"the model gave the score {r.score}"}
                   for r, ok in zip(results, usable) if not ok],
        "predictions": [{"image": str(r.source), "score": r.score, "std": r.std, "gt_score": t} for r, t in kept],
    }


def write_report(report: dict, path: Path) -> Path:
    """report.json, strict JSON: a NaN or infinity anywhere becomes null."""

    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(finite(report), indent=2, allow_nan=False))
    partial.replace(path)
    return path


def write_plots(report: dict, out: Path) -> list[Path]:
    """scatter.png (prediction vs human score) and histogram.png (both score distributions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    predicted = [p["score"] for p in report["predictions"]]
    truth = [p["gt_score"] for p in report["predictions"]]
    metrics = report["metrics"]
    if not predicted:
        return []
    figure, axes = plt.subplots(figsize=(5, 5))
    axes.scatter(truth, predicted, s=8, alpha=0.6)
    low, high = min(truth + predicted), max(truth + predicted)
    axes.plot([low, high], [low, high], color="grey", linewidth=1)
    axes.set(xlabel="human score", ylabel="predicted score",
             title=f"SRCC {_shown(metrics['srcc'])}  PLCC {_shown(metrics['plcc'])}  (n={metrics['n']})")
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


def _shown(metric: float | None) -> str:
    return "n/a" if metric is None else f"{metric:.3f}"


def scorer_for_network(network, checkpoint, device, preset: str = "artquant"):
    """An `ArtQuantScorer` around a model being trained (its weights are shared, not copied)."""
    from ..scorer.checkpoint import LoadedCheckpoint
    from ..scorer.presets import get_preset
    from ..scorer.scoring import ArtQuantScorer

    loaded = LoadedCheckpoint(network, checkpoint.tokenizer, checkpoint.image_config, "training")
    dtype = network.get_input_embeddings().weight.dtype
    return ArtQuantScorer(loaded, get_preset(preset), device, dtype)


def _on_scale(scores: list[float], scale: tuple[float, float]) -> list[float]:
    """Scores on ArtQuant's 1..10 mapped linearly onto `scale` (unchanged when it is 1..10)."""
    if tuple(scale) == tuple(SCORE_SCALE):
        return scores
    (low, high), (first, last) = scale, SCORE_SCALE
    return [low + (score - first) * (high - low) / (last - first) for score in scores]


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
    score_range: tuple[float, float] | None = None,
) -> int:
    """`artquant eval`: writes report.json (metrics, failures, per-image predictions) and the plots into `out`.
    The data's scores are on `score_range` (default: the preset's scale) and compared on the preset's scale.

    Returns 0; 1 when the report is written but some image or record failed or a metric is undefined (the report
    says which and why); 2 when the data file or `out` cannot be used at all (the message is printed)."""
    from ..scorer.scoring import ArtQuantScorer

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    folder = Path(out)
    preset = get_preset(preset)
    # The data is read onto ArtQuant's 1..10 (from --score-range, else from the preset's scale) and mapped back.
    data_range = score_range or (preset.score_range if preset.score_range != SCORE_SCALE else None)
    try:
        if score_range is not None and not score_range[0] < score_range[1]:
            raise DataError(f"--score-range needs LOW < HIGH, got {score_range[0]:g} {score_range[1]:g}.")
        images, scores, unusable = read_scored_images(
            DatasetSpec(path=data, image_folder=image_folder, score_range=data_range))
    except DataError as error:
        logger.error("%s", error)
        return 2
    try:  # before the model loads: a bad --out must not cost a scoring run
        folder.mkdir(parents=True, exist_ok=True)
        write_report({"model": str(model), "data": str(data), "status": "scoring"}, folder / "report.json")
    except OSError as error:
        logger.error("cannot write the report into %s (%s); choose another --out folder.", folder,
                     error.strerror or error)
        return 2
    try:
        scorer = ArtQuantScorer.from_pretrained(model, base=base, preset=preset, device=device, dtype=dtype)
    except ValueError as error:  # arguments that do not go together (e.g. --base with a Q-ReAlign preset)
        logger.error("%s", error)
        return 2
    report = evaluate_scorer(scorer, images, _on_scale(scores, preset.score_range), batch_size=batch_size)
    report["failed"] = unusable + report["failed"]
    report["model"], report["data"] = str(model), str(data)
    write_report(report, folder / "report.json")
    if plots:
        write_plots(report, folder)
    print(json.dumps(report["metrics"], indent=2))
    for failure in report["failed"]:
        logger.warning("not evaluated: %s: %s", failure["image"], failure["error"])
    if report["undefined"]:
        logger.warning("%s", report["undefined"])
    print(f"Report written to {folder / 'report.json'}")
    return 1 if report["failed"] or report["undefined"] else 0
