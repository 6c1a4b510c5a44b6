"""What ArtQuant Guidance adds to a sampler step in ComfyUI: guided vs unguided steps, same run, tiny models, CPU.

    ARTQUANT_COMFYUI_DIR=/path/to/ComfyUI python benchmarks/bench_comfy_guidance.py [--repeats 5] [--steps 6] [--threads 1]

Run it with ComfyUI's Python. Both paths sample the same tiny SD 1.x (epsilon) and SD 3 (flow) models of
tests/comfy_tiny_models with the same noise through ComfyUI's own KSampler code; the guided one goes through the
ArtQuant Guidance node's patched model (every step inside the window), scoring with the reference fixture's scorer.
Runs alternate (unguided first, then guided first) and the medians per step and their ratio are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE = ROOT.parent / "shared" / "fixtures" / "artquant_reference"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=Path(os.environ.get("ARTQUANT_REFERENCE", DEFAULT_REFERENCE)))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=64, help="image height and width (latents are 1/8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least disturbed on a shared machine)")
    args = parser.parse_args()

    comfy_dir = os.environ.get("ARTQUANT_COMFYUI_DIR")
    if not comfy_dir:
        sys.exit("Set ARTQUANT_COMFYUI_DIR to a ComfyUI checkout and run with its Python.")
    sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI parses the command line when its modules load
    sys.path[:0] = [comfy_dir, str(ROOT / "tests")]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.sample
    import torch
    from artquant.artquant_nodes.model_handle import load_model
    from artquant.artquant_nodes.nodes import ArtQuantGuidance
    from comfy_tiny_models import tiny_model

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} x {args.size}x{args.size}, "
          f"{args.steps} steps, {args.repeats} repeats each way")
    with torch.inference_mode():
        scorer = load_model(str(args.reference / "artquant_lora"), None, "artquant", "fp32", "cpu")
        for family, sampler in (("sd1-eps", "euler"), ("sd3-flow", "euler")):
            model, vae, conditioning = tiny_model(family, 0)
            guided = ArtQuantGuidance.execute(model, scorer, vae, 0.1, 0.0, 1.0).args[0]
            channels = 4 if family == "sd1-eps" else 16
            latent = torch.zeros(args.batch, channels, args.size // 8, args.size // 8)
            noise = comfy.sample.prepare_noise(latent, 0)

            def sample(patched):
                start = time.perf_counter()
                comfy.sample.sample(patched, noise, args.steps, 1.0, sampler, "normal", conditioning, conditioning, latent,
                                    seed=0, disable_pbar=True)
                return (time.perf_counter() - start) / args.steps

            sample(model), sample(guided)  # warm-up
            times = {"unguided": [], "guided": []}
            for repeat in range(args.repeats):
                for name in ("unguided", "guided") if repeat % 2 == 0 else ("guided", "unguided"):
                    times[name].append(sample(model if name == "unguided" else guided))
            plain, steered = statistics.median(times["unguided"]), statistics.median(times["guided"])
            print(f"{family:9s} unguided step: median {plain * 1000:7.1f} ms | guided step: median {steered * 1000:7.1f} ms"
                  f" | guided / unguided = {steered / plain:.2f}x (+{(steered - plain) * 1000:.1f} ms per guided step)")


if __name__ == "__main__":
    main()
