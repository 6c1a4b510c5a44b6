"""Peak memory of best-of-N with and without `offload` (CPU RSS; on a GPU the same holds for device memory).

A random SD-shaped pipeline (SD 1.5's UNet layout at half width, saved to a temporary folder and loaded as `artquant best-of-n` loads
it) and a quarter-width mPLUG-Owl2 scorer (~0.5 B parameters, random weights). Each mode runs in its own process:
without offload the scorer is loaded before generating, as `artquant best-of-n` does; with offload the pipeline is
released once the images exist and only then is the scorer loaded.

    python benchmarks/bench_best_of_n_offload.py [--n 2]

Prints a Markdown table: peak RSS of each mode, and the baseline RSS after the imports measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SIZE = 64


def build_pipeline(folder: Path) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from reward_tiny_pipelines import clip_text_config, clip_tokenizer
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=SIZE // 8, block_out_channels=(160, 320, 640, 640), cross_attention_dim=768, layers_per_block=2,
    )  # SD 1.5's UNet layout at half its width (~0.22 B parameters)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32),
        text_encoder=CLIPTextModel(clip_text_config(hidden_size=768, projection_dim=768)),
        tokenizer=clip_tokenizer(), unet=unet, scheduler=DDIMScheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(folder)


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it starts afresh at exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(folder: str, offload: bool, n: int, out: str) -> None:
    from artquant.reward import best_of_n_to_folder
    from gpu_common import random_model, random_scorer

    def load_scorer():
        return random_scorer(random_model(False, torch.float32, torch.device("cpu"), shape="quarter"))

    baseline = peak_rss_mib()
    scorer = load_scorer if offload else load_scorer()  # as the CLI: loaded first unless --offload
    best_of_n_to_folder(folder, "a cat", n, out, scorer, batch_size=n, device="cpu", offload=offload,
                        num_inference_steps=2, height=SIZE, width=SIZE)  # fmt: skip
    print(json.dumps({"baseline_mib": baseline, "peak_mib": peak_rss_mib()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "OFFLOAD", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        folder, offload, out = args.child
        child(folder, offload == "1", args.n, out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        build_pipeline(Path(tmp) / "pipeline")
        results = {}
        for offload in (False, True):
            command = [sys.executable, __file__, "--n", str(args.n), "--child", str(Path(tmp) / "pipeline"),
                       "1" if offload else "0", str(Path(tmp) / f"out{int(offload)}")]  # fmt: skip
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[offload] = json.loads(output.strip().splitlines()[-1])
    print(f"CPU, torch {torch.__version__}; half-width SD-1.5-shaped UNet pipeline (fp32) + quarter-width scorer (fp32), n={args.n}")
    print("| mode | baseline RSS after imports (MiB) | peak RSS (MiB) | peak over baseline (MiB) |")
    print("| --- | ---: | ---: | ---: |")
    for offload, label in ((False, "scorer loaded first (default)"), (True, "--offload")):
        baseline, peak = results[offload]["baseline_mib"], results[offload]["peak_mib"]
        print(f"| {label} | {baseline:.0f} | {peak:.0f} | {peak - baseline:.0f} |")
    saved = results[False]["peak_mib"] - results[True]["peak_mib"]
    print(f"\noffload saves {saved:.0f} MiB of peak RSS ({saved / results[False]['peak_mib']:.0%}).")


if __name__ == "__main__":
    main()
