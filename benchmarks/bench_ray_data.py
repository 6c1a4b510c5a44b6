"""`artquant score --engine ray` against the plain `artquant score` on the same 1,000 images, in the same run.

    python benchmarks/bench_ray_data.py                   # this CPU, the fixture's tiny model, 1,000 PNGs
    python benchmarks/bench_ray_data.py --images 5000 --model my_checkpoint/ --dtype bf16   # a GPU machine
    python benchmarks/bench_ray_data.py --model tests/data/qrealign_tiny --preset qrealign-mini-quality   # Q-ReAlign

Both are run as users run them (a fresh process each, wall clock including start-up: Ray's start and actor
start-up are part of the cost), alternating, `--repeats` times; the scores of the two are compared too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "artquant_reference"


def timed(command: list[str]) -> float:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    began = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--model", default=str(FIXTURE / "mplug_owl2_base"))
    parser.add_argument("--preset", default="artquant")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root, "images")
        folder.mkdir()
        for i in range(args.images):
            Image.fromarray(rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
        common = [str(folder), "--model", args.model, "--preset", args.preset, "--dtype", args.dtype,
                  "--batch-size", str(args.batch_size)]
        plain, ray = [], []
        for repeat in range(args.repeats):
            jsonl, parquet = Path(root, f"plain{repeat}.jsonl"), Path(root, f"ray{repeat}.parquet")
            plain.append(timed([sys.executable, "-m", "artquant.cli", "score", *common, "--quiet", "--out", str(jsonl)]))
            ray.append(timed([sys.executable, "-m", "artquant.cli", "score", "--engine", "ray", *common, "--out", str(parquet)]))
            print(f"repeat {repeat}: plain {plain[-1]:.1f} s, ray {ray[-1]:.1f} s", flush=True)
        import pyarrow.parquet as pq

        local = {row["path"]: row["score"] for row in map(json.loads, jsonl.read_text().splitlines())}
        table = pq.read_table(parquet).to_pydict()
        difference = max(abs(local[k] - s) for k, s in zip(table["key"], table["score"]))
    report = {
        "preset": args.preset, "images": args.images, "plain_s": statistics.median(plain), "ray_s": statistics.median(ray),
        "plain_images_per_s": args.images / statistics.median(plain), "ray_images_per_s": args.images / statistics.median(ray),
        "ray_over_plain_time": statistics.median(ray) / statistics.median(plain), "largest_score_difference": difference,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
