"""Score-based distribution estimation: `scorer.levels.score_to_level_probs` (vectorised) against the reference's
per-score scipy fit, in one run on the same machine.

    python benchmarks/bench_distribution.py [--count 70000] [--scipy-sample 300]

The scipy loop is timed on a random subsample and extrapolated to `--count` scores; both also report how far apart
their distributions are on that subsample.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.stats import norm

from artquant.scorer.levels import ARTQUANT_WEIGHTS, score_to_level_probs


def scipy_level_probs(score: float) -> np.ndarray:
    """The reference's fit of one score: L-BFGS-B on |E - s| from (s, 1), then the clipped, normalised density."""
    values = np.asarray(ARTQUANT_WEIGHTS)

    def gap(params):
        density = norm.pdf(values, loc=params[0], scale=params[1])
        return abs(density / density.sum() @ values - score)

    with np.errstate(invalid="ignore", divide="ignore"):
        mu, sigma = minimize(gap, [score, 1.0], bounds=[(-10, 10), (0.001, 1000)]).x
    density = norm.pdf(values, loc=mu, scale=sigma).clip(0, 1)
    return density / density.sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=70_000)
    parser.add_argument("--scipy-sample", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    continuous = rng.uniform(1.0, 10.0, args.count)  # worst case: every score distinct
    two_decimals = np.round(continuous, 2)  # how human mean scores are usually stored

    timings = {}
    for name, scores in (("continuous", continuous), ("two_decimals", two_decimals)):
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            ours = score_to_level_probs(scores)
            runs.append(time.perf_counter() - start)
        timings[name] = min(runs)

    sample = rng.choice(args.count, args.scipy_sample, replace=False)
    start = time.perf_counter()
    reference = np.stack([scipy_level_probs(float(continuous[i])) for i in sample])
    scipy_per_score = (time.perf_counter() - start) / args.scipy_sample
    ours_sample = score_to_level_probs(continuous[sample]).numpy()
    scipy_total = scipy_per_score * args.count
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "count": args.count,
        "ours_seconds_continuous": round(timings["continuous"], 3),
        "ours_seconds_two_decimals": round(timings["two_decimals"], 3),
        "scipy_seconds_extrapolated": round(scipy_total, 1),
        "scipy_ms_per_score": round(scipy_per_score * 1e3, 3),
        "speedup_continuous": round(scipy_total / timings["continuous"], 1),
        "speedup_two_decimals": round(scipy_total / timings["two_decimals"], 1),
        "max_abs_difference_vs_scipy": float(np.abs(ours_sample - reference).max()),
        "ours_finite": bool(np.isfinite(ours.numpy()).all()),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
