"""What the Score node adds over calling the scorer directly: a 16-image IMAGE batch, fixture model, this CPU.

    python benchmarks/bench_node_overhead.py [--reference DIR] [--repeats 15] [--size 512]

Both paths score the same BHWC float batch in the same process, interleaved; the medians and their ratio are printed.
On a busy machine the A/B medians drift, so the node's own time (its call minus the scorer call inside it, measured
in the same call) is printed too, relative to the direct call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from artquant import ArtQuantScorer
from artquant.artquant_nodes.model_handle import ArtQuantModel
from artquant.artquant_nodes.operations import score_images

DEFAULT_REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "artquant_reference"


def seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=Path(os.environ.get("ARTQUANT_REFERENCE", DEFAULT_REFERENCE)))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--size", type=int, default=512, help="image height and width")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    scorer = ArtQuantScorer.from_pretrained(args.reference / "artquant_lora", device="cpu", dtype="fp32")
    handle = ArtQuantModel.from_scorer(scorer)
    images = torch.rand(args.batch, args.size, args.size, 3, generator=torch.Generator().manual_seed(0))

    score = scorer.score  # the undecorated call, for the direct path

    def direct():
        return score(images, batch_size=8, layout="BHWC")

    inner_seconds = []

    def timed_score(*args, **kwargs):  # the scorer call inside the node, timed in place
        start = time.perf_counter()
        results = score(*args, **kwargs)
        inner_seconds.append(time.perf_counter() - start)
        return results

    handle.scorer.score = timed_score  # the node scores through the handle's scorer (same weights)

    def through_node():
        return score_images(handle, images, batch_size=8)

    direct(), through_node()  # warm-up
    inner_seconds.clear()
    times = {"direct": [], "node": []}
    for repeat in range(args.repeats):  # alternate which goes first, so drift on a busy machine hits both
        for name in ("direct", "node") if repeat % 2 == 0 else ("node", "direct"):
            times[name].append(seconds(direct if name == "direct" else through_node))
    direct_s, node_s = statistics.median(times["direct"]), statistics.median(times["node"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} x {args.size}x{args.size}, {args.repeats} repeats")
    print(f"direct scorer.score : median {direct_s * 1000:.1f} ms, min {min(times['direct']) * 1000:.1f} ms")
    print(f"Score node          : median {node_s * 1000:.1f} ms, min {min(times['node']) * 1000:.1f} ms")
    own = statistics.median(n - i for n, i in zip(times["node"], inner_seconds))
    best_ratio = min(times["node"]) / min(times["direct"])  # the fastest runs are the least disturbed by other load
    print(f"node's own work     : median {own * 1000:.1f} ms = {own / direct_s * 100:.2f}% of the direct call")
    print(f"overhead            : median {(node_s / direct_s - 1) * 100:+.1f}%, fastest run {(best_ratio - 1) * 100:+.1f}%")


if __name__ == "__main__":
    main()
