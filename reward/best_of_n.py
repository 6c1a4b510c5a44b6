"""Best-of-N sampling: generate N candidates with recorded seeds, score them with ArtQuant, keep them ranked.

Every image gets its own `torch.Generator` seeded with its own seed, so `pipe(prompt, generator=Generator().manual_seed(
seed))` reproduces a candidate on its own, whatever batch it was generated in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..scorer import ArtQuantScorer


@dataclass
class Candidate:
    """One generated image, its seed and its ArtQuant rating."""

    image: Image.Image
    seed: int
    score: float
    std: float
    level_probs: dict[str, float]


def pil_images_from_output(images: Any) -> list[Image.Image]:
    """A pipeline's `.images` (list of PIL, numpy [B, H, W, C] in [0, 1], or torch [B, C, H, W] in [0, 1]) -> PIL,
    rounded to 8 bits as diffusers' `numpy_to_pil` does."""
    if isinstance(images, (list, tuple)) and all(isinstance(image, Image.Image) for image in images):
        return list(images)
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"cannot read the pipeline's images ({type(images).__name__} {getattr(images, 'shape', '')}); use "
            "output_type 'pil', 'np' or 'pt' (not 'latent')."
        )
    if not np.isfinite(images).all():
        raise ValueError("the pipeline returned NaN pixels; run the VAE in float32 (fp16 VAEs overflow).")
    pixels = (images.clip(0, 1) * 255).round().astype(np.uint8)
    return [Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image) for image in pixels]


def _seed_list(n: int, seed: int, seeds: Sequence[int] | None) -> list[int]:
    if seeds is None:
        return list(range(seed, seed + n))
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for n={n} images; pass exactly n seeds or none.")
    return [int(s) for s in seeds]


def best_of_n(
    pipe,
    prompt: str,
    n: int,
    scorer: ArtQuantScorer,
    batch_size: int = 4,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    generator_device: str | torch.device = "cpu",
    progress=None,
    **pipe_kwargs,
) -> list[Candidate]:
    """Generates `n` images of `prompt` with `pipe` (any diffusers text-to-image pipeline), `batch_size` at a time,
    and returns them best first.

    seeds: one per image (default `seed, seed + 1, ...`); each image's noise comes from its own generator on
        `generator_device` (CPU by default: the same seed gives the same image on any machine).
    pipe_kwargs: passed to the pipeline (num_inference_steps, guidance_scale, height, width, negative_prompt,
        output_type, ...). `progress`: optional callable given the number of images just generated.
    """
    for owned in ("generator", "num_images_per_prompt", "prompt"):
        if owned in pipe_kwargs:
            raise TypeError(f"best_of_n sets {owned!r} itself (one generator per image from the seeds); remove it.")
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be at least 1, got n={n}, batch_size={batch_size}.")
    seed_list = _seed_list(n, seed, seeds)
    images: list[Image.Image] = []
    for start in range(0, n, batch_size):
        chunk = seed_list[start : start + batch_size]
        generators = [torch.Generator(generator_device).manual_seed(s) for s in chunk]
        batch_kwargs = dict(pipe_kwargs)
        if isinstance(batch_kwargs.get("negative_prompt"), str):  # pipelines want one per prompt in a batch
            batch_kwargs["negative_prompt"] = [batch_kwargs["negative_prompt"]] * len(chunk)
        output = pipe(prompt=[prompt] * len(chunk), generator=generators, **batch_kwargs)
        images.extend(pil_images_from_output(output.images))
        if progress is not None:
            progress(len(chunk))
    ratings = scorer.score(images, batch_size=batch_size)
    candidates = [
        Candidate(image, s, r.score, r.std, r.level_probs) for image, s, r in zip(images, seed_list, ratings)
    ]
    return sorted(candidates, key=lambda c: c.score, reverse=True)


def contact_sheet(candidates: Sequence[Candidate], columns: int = 4, thumbnail: int = 256) -> Image.Image:
    """A grid of the candidates in order, each thumbnail captioned with its rank, score, std and seed."""
    if not candidates:
        raise ValueError("no candidates to draw.")
    caption_height = max(14, thumbnail // 12)
    font = ImageFont.load_default(size=caption_height - 4)
    columns = min(columns, len(candidates))
    rows = -(-len(candidates) // columns)
    sheet = Image.new("RGB", (columns * thumbnail, rows * (thumbnail + caption_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, candidate in enumerate(candidates):
        x, y = (index % columns) * thumbnail, (index // columns) * (thumbnail + caption_height)
        image = candidate.image.convert("RGB")
        image.thumbnail((thumbnail, thumbnail))
        sheet.paste(image, (x + (thumbnail - image.width) // 2, y + (thumbnail - image.height) // 2))
        caption = f"#{index + 1}  {candidate.score:.2f} ± {candidate.std:.2f}  seed {candidate.seed}"
        draw.text((x + 4, y + thumbnail + 2), caption, fill="black", font=font)
    return sheet


def write_candidates(candidates: Sequence[Candidate], out_dir: str | os.PathLike, prompt: str) -> dict[str, Any]:
    """Writes `rank{k}_seed{seed}.png` per candidate, `scores.json` and `contact_sheet.png`; returns the JSON."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for rank, candidate in enumerate(candidates, start=1):
        name = f"rank{rank:02d}_seed{candidate.seed}.png"
        candidate.image.save(out / name)
        entries.append({"rank": rank, "file": name, "seed": candidate.seed, "score": candidate.score,
                        "std": candidate.std, "level_probs": candidate.level_probs})
    summary = {"prompt": prompt, "candidates": entries}
    (out / "scores.json").write_text(json.dumps(summary, indent=2))
    contact_sheet(candidates).save(out / "contact_sheet.png")
    return summary


def best_of_n_to_folder(
    pipeline_dir: str | os.PathLike,
    prompt: str,
    n: int,
    out_dir: str | os.PathLike,
    scorer: ArtQuantScorer,
    batch_size: int = 4,
    seed: int = 0,
    device: str | torch.device | None = None,
    torch_dtype: torch.dtype | None = None,
    **pipe_kwargs,
) -> dict[str, Any]:
    """Loads a diffusers pipeline folder (or hub id), runs `best_of_n` and writes the results to `out_dir`
    (see `write_candidates`). Returns the `scores.json` content."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(pipeline_dir, torch_dtype=torch_dtype)
    pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe.set_progress_bar_config(disable=True)
    candidates = best_of_n(pipe, prompt, n, scorer, batch_size=batch_size, seed=seed, **pipe_kwargs)
    return write_candidates(candidates, out_dir, prompt)


def add_best_of_n_arguments(parser) -> None:
    """The arguments of `artquant best-of-n` (for the CLI's sub-parser)."""
    parser.add_argument("--pipeline", required=True, help="diffusers pipeline folder or Hugging Face id")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--n", type=int, default=8, help="number of candidates")
    parser.add_argument("--out", required=True, help="output folder (images, scores.json, contact_sheet.png)")
    parser.add_argument("--seed", type=int, default=0, help="first seed; candidate k uses seed + k")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps (pipeline default if unset)")
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--pipeline-dtype", choices=["fp32", "fp16", "bf16"], default=None)
    parser.add_argument("--model", default=None, help="scorer checkpoint (default: the preset's)")
    parser.add_argument("--preset", default="artquant")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="scorer dtype: auto, bf16, fp16 or fp32")


def run_best_of_n_cli(args) -> dict[str, Any]:
    """Runs `artquant best-of-n` from parsed `args` (see `add_best_of_n_arguments`)."""
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    scorer = ArtQuantScorer.from_pretrained(args.model, preset=args.preset, dtype=args.dtype, device=args.device)
    optional = {"num_inference_steps": args.steps, "guidance_scale": args.guidance_scale,
                "negative_prompt": args.negative_prompt, "height": args.height, "width": args.width}
    return best_of_n_to_folder(
        args.pipeline, args.prompt, args.n, args.out, scorer,
        batch_size=args.batch_size, seed=args.seed, device=args.device,
        torch_dtype=dtypes.get(args.pipeline_dtype),
        **{k: v for k, v in optional.items() if v is not None},
    )
