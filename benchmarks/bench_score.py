"""CPU throughput of `ArtQuantScorer.score` against a baseline written in the reference's style.

Baseline (as `src/evaluate/iqa_eval.py` scores): one image at a time, expand2square + CLIPImageProcessor on PIL,
a forward pass that computes the LM head at every position, level logits read from the last one.
Ours: batched, torch preprocessing, LM head at the answer position only. Both in one run, same model, same images.

    python benchmarks/bench_score.py --images 64 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from artquant import ArtQuantScorer

DEFAULT_REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "artquant_reference"


def expand2square(image: Image.Image, colour) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), colour)
    canvas.paste(image, (0, (side - height) // 2) if width > height else ((side - width) // 2, 0))
    return canvas


def baseline_scores(scorer: ArtQuantScorer, processor, paths: list[Path]) -> list[float]:
    colour = tuple(int(m * 255) for m in processor.image_mean)
    weights = torch.tensor(scorer.preset.level_weights)
    scores = []
    with torch.inference_mode():
        for path in paths:
            image = expand2square(Image.open(path).convert("RGB"), colour)
            pixel_values = processor(image, return_tensors="pt")["pixel_values"]
            logits = scorer.model(input_ids=scorer.prompt_ids[None], pixel_values=pixel_values).logits[:, -1]
            scores.append(float(torch.softmax(logits[:, scorer.level_ids], -1)[0] @ weights))
    return scores


def paired_timings(baseline, ours, repeats: int) -> list[tuple[float, float]]:
    """(baseline seconds, ours seconds) per repeat, measured back to back so both see the same machine load."""
    pairs = []
    for _ in range(repeats):
        start = time.perf_counter()
        baseline()
        middle = time.perf_counter()
        ours()
        pairs.append((middle - start, time.perf_counter() - middle))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default=os.environ.get("ARTQUANT_REFERENCE", DEFAULT_REFERENCE))
    parser.add_argument("--images", type=int, default=64, help="images per timed run (the fixture's six, repeated)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--workers", type=int, default=1, help="input threads of `score` (default 1, as the baseline)")
    args = parser.parse_args()

    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    reference = Path(args.reference)
    scorer = ArtQuantScorer.from_pretrained(reference / "mplug_owl2_base", device="cpu", dtype="fp32")
    processor = CLIPImageProcessorPil.from_pretrained(reference / "mplug_owl2_base")
    photos = sorted((reference / "images").iterdir())
    paths = [photos[i % len(photos)] for i in range(args.images)]

    if args.threads:
        torch.set_num_threads(args.threads)
    expected = baseline_scores(scorer, processor, paths)  # also the warm-up
    results = scorer.score(paths, batch_size=args.batch_size, workers=args.workers)
    worst = max(abs(r.score - e) for r, e in zip(results, expected))
    pairs = paired_timings(
        lambda: baseline_scores(scorer, processor, paths),
        lambda: scorer.score(paths, batch_size=args.batch_size, workers=args.workers),
        args.repeats,
    )
    report = {
        "machine": f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "images": args.images,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "baseline_images_per_s": args.images / statistics.median(b for b, _ in pairs),
        "ours_images_per_s": args.images / statistics.median(o for _, o in pairs),
        "speedup_median_of_pairs": statistics.median(b / o for b, o in pairs),
        "speedup_range": [min(b / o for b, o in pairs), max(b / o for b, o in pairs)],
        "max_score_difference": worst,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
