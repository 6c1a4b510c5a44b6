"""GPU scoring throughput of a 7B-shaped mPLUG-Owl2 (random bf16 weights, no download).

The scorer's own path (`ArtQuantScorer.level_logits` after torch preprocessing on the GPU of uint8 1024 x 1024
images: ViT, abstractor, LLM, LM head at the answer position) at batch 1, 16 and 64, with the prompt-prefix cache
on and off, then the same with `torch.compile` of the vision tower and the LLM's layers. Per row: images/s, peak GPU
memory and the fraction of the card's dense bf16 rate reached on the analytic FLOPs of the whole prompt's forward
pass (so the rows with the cache count the work it saves as done). Also the batch size
`--batch-size auto` picks and its throughput. Baseline in the same run: the reference's style, one image at a time
with the LM head at every position. Rows are printed as they are measured, so a time-out keeps the earlier ones.

    python benchmarks/gpu_score.py                # on a GPU machine
    python benchmarks/gpu_score.py --tiny         # a tiny model on the CPU: proves the script runs
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from artquant.scorer import pixel_values_from_images
from gpu_common import forward_flops_per_image, peak_flops, random_model, random_scorer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, device: torch.device, iterations: int) -> float:
    """Seconds per call of `step`, median of `iterations` after one warm-up (which also triggers compilation)."""
    times = []
    with torch.inference_mode():
        for index in range(iterations + 1):
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            if index:
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--peak-tflops", type=float)
    parser.add_argument("--compile-backend", help="torch.compile backend (default: inductor; eager with --tiny)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    parser.add_argument("--out", help="write the JSON report here too")
    args = parser.parse_args()

    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    scorer = random_scorer(random_model(args.tiny, dtype, device))
    model = scorer.model
    flops = forward_flops_per_image(model.config)
    peak, peak_note = peak_flops(args.peak_tflops)
    side = 96 if args.tiny else args.image_size
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU (--tiny)",
        "peak": peak_note,
        "model": "tiny" if args.tiny else "7B-shaped mPLUG-Owl2, random bf16 weights, SDPA",
        "tflop_per_image": flops / 1e12,
        "input": f"uint8 {side}x{side}, preprocessing on the device",
        "rows": [],
    }

    def images_of(batch: int) -> torch.Tensor:
        return torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, device=device)

    def add_row(path: str, batch: int, seconds: float, baseline: float | None) -> None:
        row = {"path": path, "batch": batch, "images_per_s": batch / seconds}
        if device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if peak:
            row["fraction_of_bf16_peak"] = batch * flops / seconds / peak
        if baseline:
            row["speedup_vs_baseline"] = row["images_per_s"] * baseline
        report["rows"].append(row)
        print(json.dumps(row), flush=True)

    def reset_peak() -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    # Baseline: one image per call, the whole prompt every time, LM head at every position.
    one = images_of(1)
    ids = scorer.prompt_ids[None]

    def baseline_step() -> None:
        pixel_values = pixel_values_from_images(one, scorer.image_config).to(dtype)
        model(input_ids=ids, pixel_values=pixel_values, use_cache=False).logits.float()

    reset_peak()
    baseline = measure(baseline_step, device, args.iterations)
    add_row("baseline: batch 1, whole prompt, LM head at every position", 1, baseline, None)

    def scoring_rows(label: str) -> None:
        for batch in map(int, args.batch_sizes.split(",")):
            images = images_of(batch)
            for cached in (True, False):
                scorer.prefix_caching = cached
                reset_peak()
                seconds = measure(lambda: scorer.level_logits(pixel_values_from_images(images, scorer.image_config)),
                                  device, args.iterations)
                add_row(f"{label}, prefix cache {'on' if cached else 'off'}", batch, seconds, baseline)
        scorer.prefix_caching = True

    scoring_rows("artquant")
    auto = scorer.largest_batch_size()
    images = images_of(auto)
    reset_peak()
    seconds = measure(lambda: scorer.level_logits(pixel_values_from_images(images, scorer.image_config)), device, args.iterations)
    add_row(f"artquant, --batch-size auto ({auto})", auto, seconds, baseline)

    if not args.no_compile:
        backend = args.compile_backend or ("eager" if args.tiny else "inductor")
        start = time.perf_counter()
        model.compile_blocks(backend=backend)
        scoring_rows(f"artquant + torch.compile ({backend})")
        report["compile_and_compiled_rows_s"] = time.perf_counter() - start

    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
