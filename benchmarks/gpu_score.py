"""GPU scoring throughput of a 7B-shaped mPLUG-Owl2 (random bf16 weights, no download).

For batch sizes 1, 16 and 64: images/s of the scoring path (uint8 1024 x 1024 images -> torch preprocessing on the
GPU -> ViT, abstractor, LLM, LM head at the answer position), peak GPU memory, and the fraction of the card's dense
bf16 rate reached on the analytic forward FLOPs. Baseline in the same run: the reference's style, one image at a
time with the LM head at every position.

    python benchmarks/gpu_score.py                # on a GPU machine
    python benchmarks/gpu_score.py --tiny         # a tiny model on the CPU: proves the script runs
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from artquant.scorer import ImageProcessingConfig, pixel_values_from_images
from gpu_common import forward_flops_per_image, peak_flops, prompt_ids, random_model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, images: torch.Tensor, image_config, logits_to_keep: int, iterations: int) -> float:
    """Seconds per batch, median of `iterations` after one warm-up."""
    ids = prompt_ids(images.shape[0], images.device)
    times = []
    with torch.inference_mode():
        for step in range(iterations + 1):
            synchronize(images.device)
            start = time.perf_counter()
            pixel_values = pixel_values_from_images(images, image_config).to(model.dtype)
            model(input_ids=ids, pixel_values=pixel_values, logits_to_keep=logits_to_keep, use_cache=False).logits.float()
            synchronize(images.device)
            if step:
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--peak-tflops", type=float)
    parser.add_argument("--out", help="write the JSON report here too")
    args = parser.parse_args()

    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model = random_model(args.tiny, dtype, device)
    size = model.config.vision_config.image_size
    image_config = ImageProcessingConfig(resize_to=size, crop_size=size)
    flops = forward_flops_per_image(model.config)
    peak, peak_note = peak_flops(args.peak_tflops)
    side = 96 if args.tiny else args.image_size

    rows = []
    one = torch.randint(0, 256, (1, 3, side, side), dtype=torch.uint8, device=device)
    baseline = measure(model, one, image_config, logits_to_keep=0, iterations=args.iterations)
    rows.append({"path": "baseline: batch 1, LM head at every position", "batch": 1, "images_per_s": 1 / baseline})
    for batch in map(int, args.batch_sizes.split(",")):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        images = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, device=device)
        seconds = measure(model, images, image_config, logits_to_keep=1, iterations=args.iterations)
        row = {"path": "artquant", "batch": batch, "images_per_s": batch / seconds}
        if device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if peak:
            row["fraction_of_bf16_peak"] = batch * flops / seconds / peak
        row["speedup_vs_baseline"] = row["images_per_s"] * baseline
        rows.append(row)
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU (--tiny)",
        "peak": peak_note,
        "model": "tiny" if args.tiny else "7B-shaped mPLUG-Owl2, random bf16 weights, SDPA",
        "tflop_per_image": flops / 1e12,
        "input": f"uint8 {side}x{side}, preprocessing on the device",
        "rows": rows,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
