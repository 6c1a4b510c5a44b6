"""Differentiable-reward throughput and peak memory of a 7B-shaped scorer (random weights, no download).

mPLUG-Owl2 at its real sizes (LLaMA-2-7B language model, ViT-L/14 at 448 px, 6-layer abstractor) in bf16,
batch 8 of 512 x 512 images: rewards/s and peak GPU memory for the plain reward (no gradients) and for
forward + backward with the scorer's activation checkpointing off and on.

    python benchmarks/gpu_reward.py                 # a CUDA GPU, ~16 GB of weights
    python benchmarks/gpu_reward.py --tiny          # the same code on the CPU with a tiny config (a smoke test)
"""

from __future__ import annotations

import argparse

import torch
from artquant.reward import ArtQuantReward
from gpu_common import random_model, random_scorer, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU (proves the script runs)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512, help="input image side (resized to the model's 448)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    scorer = random_scorer(random_model(args.tiny, dtype, device))
    images = torch.rand(args.batch, 3, args.size, args.size, device=device)

    def with_gradients(reward: ArtQuantReward):
        def run():
            pixels = images.clone().requires_grad_(True)
            reward.differentiable(pixels).sum().backward()

        return run

    plain = ArtQuantReward(scorer, gradient_checkpointing=False)
    # Checkpointing "off" must run first: turning it on (the second reward) changes the shared model for good.
    rows = {
        "no gradients (torch.no_grad)": lambda: torch.no_grad()(plain.differentiable)(images),
        "forward + backward, checkpointing off": with_gradients(plain),
        "forward + backward, checkpointing on": with_gradients(ArtQuantReward(scorer, gradient_checkpointing=True)),
    }
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (--tiny)"
    parameters = sum(p.numel() for p in scorer.model.parameters()) / 1e6
    print(
        f"{name}: {parameters:,.1f}M-parameter scorer, {dtype}, batch {args.batch} of {args.size}x{args.size}, "
        f"mean of {args.repeats}"
    )
    print("| what | rewards/s | peak memory (GiB) |\n| --- | ---: | ---: |")
    for label, run in rows.items():
        try:
            seconds, peak = timed(run, device, args.repeats)
        except torch.OutOfMemoryError:
            print(f"| {label} | out of memory | - |")
            torch.cuda.empty_cache()
            continue
        print(f"| {label} | {args.batch / seconds:.2f} | {'n/a' if peak is None else f'{peak:.1f}'} |")


if __name__ == "__main__":
    main()
