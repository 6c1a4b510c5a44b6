"""Load-to-first-score of a quarter-width random mPLUG-Owl2 saved as safetensors, split into import, load and scoring.

The checkpoint (about 0.5 B parameters, bf16 safetensors, ~1 GB; the fixture's LLaMA tokenizer; 448 px) is
written once. Each measurement is a fresh Python process, so imports count; the two paths take turns:

* `artquant`: `ArtQuantScorer.from_pretrained(folder, device, dtype)` then `score([image])`;
* `plain transformers`: `MPLUGOwl2LlamaForCausalLM.from_pretrained(folder, dtype=...)` (transformers' own loader
  with the same architecture class), `.to(device)`, then the reference's way to score: CLIPImageProcessor on
  the PIL image, forward pass with the LM head at every position.

Wall and CPU seconds (`time.process_time`, all threads) per phase: on a shared machine the CPU time is the
steadier figure. Peak RAM is the process's maximum resident set (`ru_maxrss`, which counts the memory-mapped weight pages it
touched). The files are read once before the runs, so both paths find them in the page cache.

    python benchmarks/bench_load.py --folder /tmp/quarter-mplug-owl2 --repeats 2
    python benchmarks/bench_load.py --tiny            # seconds: proves the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_REFERENCE = HERE.parents[1] / "shared" / "fixtures" / "artquant_reference"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def child(path: str, folder: str, image: str, device: str, dtype_name: str) -> dict:
    """One load-to-first-score in this (fresh) process."""
    start, start_cpu = time.perf_counter(), time.process_time()
    if path == "artquant":
        from artquant import ArtQuantScorer

        imported, imported_cpu = time.perf_counter(), time.process_time()
        scorer = ArtQuantScorer.from_pretrained(folder, device=device, dtype=dtype_name)
        loaded, loaded_cpu = time.perf_counter(), time.process_time()
        score = scorer.score([image], workers=1)[0].score
    else:
        import torch
        from PIL import Image
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        from artquant.scorer import MPLUGOwl2LlamaForCausalLM
        from bench_score import expand2square
        from gpu_common import ARTQUANT_PROMPT_IDS, LEVEL_IDS

        imported, imported_cpu = time.perf_counter(), time.process_time()
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        model = MPLUGOwl2LlamaForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        processor = CLIPImageProcessorPil.from_pretrained(folder)
        loaded, loaded_cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            picture = expand2square(Image.open(image).convert("RGB"), tuple(int(m * 255) for m in processor.image_mean))
            pixel_values = processor(picture, return_tensors="pt")["pixel_values"].to(device, dtype)
            logits = model(input_ids=torch.tensor([ARTQUANT_PROMPT_IDS], device=device), pixel_values=pixel_values).logits
            probs = torch.softmax(logits[0, -1, list(LEVEL_IDS.values())].float(), -1)
            score = float(probs @ torch.tensor([10, 7.5, 5, 3.5, 1.0], device=probs.device))
    done, done_cpu = time.perf_counter(), time.process_time()
    return {"import_s": imported - start, "load_s": loaded - imported, "first_score_s": done - loaded,
            "total_s": done - start, "import_cpu_s": imported_cpu - start_cpu, "load_cpu_s": loaded_cpu - imported_cpu,
            "first_score_cpu_s": done_cpu - loaded_cpu, "total_cpu_s": done_cpu - start_cpu,
            "peak_rss_gib": peak_rss_gib(), "score": score}


def make_checkpoint(folder: Path, tiny: bool, reference: Path) -> None:
    import shutil

    import torch

    from artquant.scorer import ImageProcessingConfig
    from gpu_common import random_model

    torch.manual_seed(0)
    model = random_model(tiny, torch.bfloat16, torch.device("cpu"), shape="tiny" if tiny else "quarter")
    model.save_pretrained(folder)
    shutil.copyfile(reference / "mplug_owl2_base" / "tokenizer.model", folder / "tokenizer.model")
    size = model.config.vision_config.image_size
    config = ImageProcessingConfig(resize_to=size, crop_size=size).to_dict()
    (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default="/tmp/artquant-bench-load", help="where the checkpoint is (written if absent)")
    parser.add_argument("--reference", default=os.environ.get("ARTQUANT_REFERENCE", DEFAULT_REFERENCE))
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each run (default 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="the dtype both paths load into")
    parser.add_argument("--child", nargs=3, metavar=("PATH", "FOLDER", "IMAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch is imported by the measured code
        print(json.dumps(child(*args.child, args.device, args.dtype)))
        return

    reference, folder = Path(args.reference), Path(args.folder + ("-tiny" if args.tiny else ""))
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        make_checkpoint(folder, args.tiny, reference)
    image = str(sorted((reference / "images").iterdir())[0])
    weights = sorted(folder.glob("*.safetensors"))
    for file in weights:  # into the page cache, for both paths alike
        file.read_bytes()
    runs: dict[str, list[dict]] = {"artquant": [], "plain transformers": []}
    for _ in range(args.repeats):
        for path in runs:
            command = [sys.executable, __file__, "--device", args.device, "--dtype", args.dtype,
                       "--threads", str(args.threads), "--child", path, str(folder), image]
            output = subprocess.run(command, capture_output=True, text=True, check=True, cwd=HERE).stdout
            runs[path].append(json.loads(output.strip().splitlines()[-1]))
    report = {
        "machine": f"{args.device}, {os.cpu_count()} cores",
        "checkpoint": f"{folder} ({sum(f.stat().st_size for f in weights) / 2**30:.2f} GiB of bf16 safetensors), loaded as {args.dtype}",
        "runs_per_path": args.repeats,
    }
    for path, results in runs.items():
        report[path] = {key: statistics.median(r[key] for r in results) for key in results[0] if key != "score"}
        report[path]["score"] = results[0]["score"]
    report["ratio_plain_over_artquant"] = {
        key: report["plain transformers"][key] / report["artquant"][key] for key in report["artquant"] if key != "score"
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
