"""Decode + preprocess throughput of the input pipeline (`iter_pixel_batches`, what `score` runs) with 1 vs N threads.

1024 x 1024 photos-like images (smooth gradients plus noise, so PNG does not compress them away), written once as
JPEG (quality 90) and PNG, turned into 448 px `pixel_values` batches of 16 on the CPU. Each repeat times 1 worker
and N workers back to back (wall time: parallelism is the point); the ratio is the median over the pairs. The load
average before and after is printed: on a shared machine, other jobs take cores from the threads.

    python benchmarks/bench_input_pipeline.py --images 48 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from artquant.scorer import ImageProcessingConfig
from artquant.scorer.preprocessing import iter_pixel_batches


def write_images(folder: Path, count: int, side: int, suffix: str) -> list[Path]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:side, 0:side] / side
    paths = []
    for index in range(count):
        phase = rng.uniform(0, 6.28, 3)
        smooth = np.stack([np.sin(6 * x + phase[c]) * np.cos(4 * y - phase[c]) for c in range(3)], -1)
        pixels = np.clip(127 + 90 * smooth + rng.normal(0, 12, (side, side, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{index:03d}{suffix}"
        Image.fromarray(pixels).save(path, quality=90) if suffix == ".jpg" else Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def run(paths: list[Path], config: ImageProcessingConfig, batch_size: int, workers: int) -> float:
    start = time.perf_counter()
    count = sum(len(batch.sources) for batch in iter_pixel_batches(paths, config, batch_size, workers=workers))
    assert count == len(paths)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads (default 1: the workers are the parallelism)")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    config = ImageProcessingConfig()  # mPLUG-Owl2's 448 px
    report = {"machine": f"CPU, {os.cpu_count()} cores, torch {torch.__version__}", "load_average_before": os.getloadavg(),
              "images": args.images, "side": args.side, "batch_size": args.batch_size, "workers": args.workers}
    with tempfile.TemporaryDirectory() as folder:
        for suffix in (".jpg", ".png"):
            paths = write_images(Path(folder), args.images, args.side, suffix)
            run(paths[: args.batch_size], config, args.batch_size, args.workers)  # warm-up (resampling matrices)
            pairs = [(run(paths, config, args.batch_size, 1), run(paths, config, args.batch_size, args.workers))
                     for _ in range(args.repeats)]
            report[suffix[1:]] = {
                "one_worker_images_per_s": args.images / statistics.median(one for one, _ in pairs),
                "n_workers_images_per_s": args.images / statistics.median(many for _, many in pairs),
                "speedup_median_of_pairs": statistics.median(one / many for one, many in pairs),
                "speedup_range": [min(one / many for one, many in pairs), max(one / many for one, many in pairs)],
            }
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
