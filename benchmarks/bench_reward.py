"""Reward cost per image on this CPU with the fixture scorer: the plain `score` call (baseline) against the
ddpo-style reward (no gradients) and the differentiable reward (forward + backward, checkpointing on and off).

    python benchmarks/bench_reward.py [--batch 8] [--size 512] [--repeats 5]

Prints a Markdown table; ratios are to `scorer.score` measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from artquant import ArtQuantScorer
from artquant.reward import ArtQuantReward

DEFAULT_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "artquant_reference"


def median_seconds(runs: dict, repeats: int) -> dict[str, float]:
    """Median wall time of each run; the runs take turns so that a change in machine load hits them all alike."""
    for run in runs.values():
        run()  # warm-up: resampling matrices, allocator
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default=os.environ.get("ARTQUANT_REFERENCE", DEFAULT_REFERENCE))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (an SD-1.5 output is 512)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    scorer = ArtQuantScorer.from_pretrained(Path(args.reference) / "artquant_lora", device="cpu", dtype="fp32")
    images = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))

    def private_reward(checkpointing: bool) -> ArtQuantReward:
        clone = copy.copy(scorer)
        clone.model = copy.deepcopy(scorer.model)
        return ArtQuantReward(clone, gradient_checkpointing=checkpointing)

    def with_gradients(reward: ArtQuantReward):
        def run():
            pixels = images.clone().requires_grad_(True)
            reward.differentiable(pixels).sum().backward()

        return run

    plain_reward = private_reward(True)
    rows = {
        "scorer.score (baseline)": lambda: scorer.score(images, batch_size=args.batch),
        "reward_fn (no gradients)": lambda: plain_reward(images),
        "differentiable, forward only (no_grad)": lambda: torch.no_grad()(plain_reward.differentiable)(images),
        "differentiable, forward + backward, checkpointing on": with_gradients(private_reward(True)),
        "differentiable, forward + backward, checkpointing off": with_gradients(private_reward(False)),
    }
    seconds = median_seconds(rows, args.repeats)
    baseline = seconds["scorer.score (baseline)"]
    print(
        f"CPU: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"fixture scorer (fp32), batch {args.batch} of {args.size}x{args.size}, median of {args.repeats}"
    )
    print("| what | ms / image | ratio to score() |\n| --- | ---: | ---: |")
    for name, value in seconds.items():
        print(f"| {name} | {1000 * value / args.batch:.2f} | {value / baseline:.2f} |")


if __name__ == "__main__":
    main()
