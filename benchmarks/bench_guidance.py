"""Reward guidance on this CPU: the extra cost of a guided step relative to an unguided one, for each pipeline
family (tiny random SD 1.x, SDXL, SD3 and Flux pipelines, the fixture scorer), all in one run.

    python benchmarks/bench_guidance.py [--size 64] [--steps 6] [--repeats 5] [--threads 1]

Each family samples the same prompt and seeds unguided (the baseline) and with every step guided; the runs take
turns. Prints a Markdown table: ms per step unguided and guided, and the guided step's cost as a ratio to the
unguided step of the same family (ms per step: a whole call divided by its steps).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny pipelines the tests build offline

from artquant import ArtQuantScorer  # noqa: E402
from artquant.reward import ArtQuantReward, RewardGuidance  # noqa: E402
from reward_tiny_pipelines import BUILDERS, CALL_OPTIONS  # noqa: E402

DEFAULT_REFERENCE = ROOT.parent / "shared" / "fixtures" / "artquant_reference"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default=os.environ.get("ARTQUANT_REFERENCE", DEFAULT_REFERENCE))
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    scorer = ArtQuantScorer.from_pretrained(Path(args.reference) / "artquant_lora", device="cpu", dtype="fp32")
    reward = ArtQuantReward(scorer)
    runs = {}
    for family, build in BUILDERS.items():
        pipe = build()
        guidance = RewardGuidance(reward, scale=1.0)

        def sample(pipe=pipe, family=family):
            generators = [torch.Generator().manual_seed(seed) for seed in range(args.batch)]
            options = dict(CALL_OPTIONS[family], height=args.size, width=args.size, output_type="pt")
            pipe(["a cat"] * args.batch, generator=generators, num_inference_steps=args.steps, **options)

        def guided(pipe=pipe, sample=sample, guidance=guidance):
            with guidance.attached(pipe):
                sample()

        runs[(family, "unguided")] = sample
        runs[(family, "guided")] = guided

    for run in runs.values():
        run()  # warm-up
    times = {key: [] for key in runs}
    for _ in range(args.repeats):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    per_step = {key: statistics.median(values) / args.steps * 1000 for key, values in times.items()}

    print(
        f"CPU: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; tiny random "
        f"pipelines, fixture scorer (fp32), batch {args.batch} of {args.size}x{args.size}, {args.steps} steps, "
        f"median of {args.repeats}"
    )
    print("| family | ms / step unguided | ms / step guided | extra ms per guided step | extra / unguided step |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for family in BUILDERS:
        plain, guided = per_step[(family, "unguided")], per_step[(family, "guided")]
        print(f"| {family} | {plain:.1f} | {guided:.1f} | {guided - plain:.1f} | {(guided - plain) / plain:.2f} |")


if __name__ == "__main__":
    main()
