"""Would worker processes feed `score` faster than its input threads? A design check, not a shipped path.

Same run, same scorer, the fixture's tiny model and its six photos repeated, batch 32, one torch thread:
- threads: `scorer.score(paths, workers=W)`, what the project ships;
- processes: W forked workers decode and preprocess chunks of 8 images (the same `load_image_or_error` and
  `image_config.pixel_values`), all submitted up front so they run ahead of the model, which scores each batch of 32
  with `score_pixel_batch`.
Each repeat times both back to back; the ratio is the median over the pairs. Scores are checked equal.

    python benchmarks/bench_input_processes.py --images 64 --workers 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from artquant import ArtQuantScorer
from artquant.scorer.images import DEFAULT_MAX_PIXELS, load_image_or_error
from artquant.scorer.preprocessing import PixelBatch

DEFAULT_REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "artquant_reference"
CHUNK = 8
_config = None  # the image config, inherited by the forked workers


def _prepare(paths: list[str]) -> torch.Tensor:
    torch.set_num_threads(1)
    return torch.cat([_config.pixel_values(load_image_or_error(p, DEFAULT_MAX_PIXELS, p)[1][None]) for p in paths])


def score_with_processes(scorer: ArtQuantScorer, pool: ProcessPoolExecutor, paths: list[str], batch_size: int) -> list:
    chunks = [pool.submit(_prepare, paths[i:i + CHUNK]) for i in range(0, len(paths), CHUNK)]
    per_batch, results = batch_size // CHUNK, []
    for first in range(0, len(chunks), per_batch):
        pixel_values = torch.cat([chunk.result() for chunk in chunks[first:first + per_batch]])
        sources = paths[first * CHUNK:first * CHUNK + len(pixel_values)]
        results += scorer.score_pixel_batch(PixelBatch(sources, [None] * len(sources), pixel_values))
    return results


def main() -> None:
    global _config
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default=os.environ.get("ARTQUANT_REFERENCE", DEFAULT_REFERENCE))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help=f"a multiple of {CHUNK}")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    reference = Path(args.reference)
    scorer = ArtQuantScorer.from_pretrained(reference / "mplug_owl2_base", device="cpu", dtype="fp32")
    _config = scorer.image_config
    photos = sorted((reference / "images").iterdir())
    paths = [str(photos[i % len(photos)]) for i in range(args.images)]
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("fork")) as pool:
        threaded = scorer.score(paths, batch_size=args.batch_size, workers=args.workers)  # also the warm-ups
        forked = score_with_processes(scorer, pool, paths, args.batch_size)
        worst = max(abs(a.score - b.score) for a, b in zip(threaded, forked))
        pairs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            scorer.score(paths, batch_size=args.batch_size, workers=args.workers)
            middle = time.perf_counter()
            score_with_processes(scorer, pool, paths, args.batch_size)
            pairs.append((middle - start, time.perf_counter() - middle))
    print(json.dumps({
        "machine": f"CPU, {os.cpu_count()} cores, 1 torch thread, torch {torch.__version__}",
        "images": args.images, "batch_size": args.batch_size, "workers": args.workers,
        "threads_images_per_s": args.images / statistics.median(t for t, _ in pairs),
        "processes_images_per_s": args.images / statistics.median(p for _, p in pairs),
        "processes_vs_threads_median_of_pairs": statistics.median(t / p for t, p in pairs),
        "max_score_difference": worst,
    }, indent=1))


if __name__ == "__main__":
    main()
