"""Best-of-N sampling: generate N candidates with recorded seeds, score them with ArtQuant, keep them ranked.

Every image gets its own `torch.Generator` seeded with its own seed, so `pipe(prompt, generator=Generator().manual_seed(
seed))` reproduces a candidate on its own, whatever batch it was generated in.
"""

from __future__ import annotations

import gc
import inspect
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..scorer import ArtQuantScorer


@dataclass
class Candidate:
    """One generated image, its seed and its ArtQuant rating; `error` says why an image has no score (NaN)."""

    image: Image.Image
    seed: int
    score: float
    std: float
    level_probs: dict[str, float]
    error: str | None = None


def pil_images_from_output(images: Any) -> tuple[list[Image.Image], list[str | None]]:
    """A pipeline's `.images` (list of PIL, numpy [B, H, W, C] in [0, 1], or torch [B, C, H, W] in [0, 1]) -> PIL,
    rounded to 8 bits as diffusers' `numpy_to_pil` does, and per image None or why it is unusable (NaN pixels,
    drawn black)."""
    if isinstance(images, (list, tuple)) and all(isinstance(image, Image.Image) for image in images):
        return list(images), [None] * len(images)
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"cannot read the pipeline's images ({type(images).__name__} {getattr(images, 'shape', '')}); use "
            "output_type 'pil', 'np' or 'pt' (not 'latent')."
        )
    finite = np.isfinite(images).all(axis=(1, 2, 3))
    pixels = (np.where(finite[:, None, None, None], images, 0).clip(0, 1) * 255).round().astype(np.uint8)
    pil = [Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image) for image in pixels]
    nan_error = "the pipeline returned NaN pixels; run the VAE in float32 (fp16 VAEs overflow)"
    return pil, [None if ok else nan_error for ok in finite]


def parse_pipe_args(items: Sequence[str]) -> dict[str, Any]:
    """`["key=value", ...]` -> pipeline keyword arguments; values read as JSON where they parse (4 -> int,
    4.5 -> float, true -> bool, null -> None, [1, 2] -> list), else kept as text."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"pipeline argument {item!r} is not key=value (e.g. true_cfg_scale=4 or max_sequence_length=256).")
        try:
            parsed[key] = json.loads(text)
        except json.JSONDecodeError:
            parsed[key] = text
    return parsed


def _seed_list(n: int, seed: int, seeds: Sequence[int] | None) -> list[int]:
    if seeds is None:
        return list(range(seed, seed + n))
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for n={n} images; pass exactly n seeds or none.")
    return [int(s) for s in seeds]


def check_negative_prompt(pipe, pipe_kwargs: dict[str, Any]) -> None:
    """Refuses a negative prompt that the pipeline would silently ignore: one it does not take at all, or one whose
    guidance is off (Flux reads it only with true_cfg_scale > 1; SD/SDXL/SD3 only with guidance_scale > 1)."""
    if pipe_kwargs.get("negative_prompt") is None:
        return
    parameters = inspect.signature(pipe.__call__).parameters
    if "negative_prompt" not in parameters:
        raise ValueError(f"{type(pipe).__name__} takes no negative prompt; drop it.")
    knob = "true_cfg_scale" if "true_cfg_scale" in parameters else "guidance_scale"
    default = parameters[knob].default if knob in parameters else None
    value = pipe_kwargs.get(knob, default)
    if isinstance(value, (int, float)) and value <= 1:
        cost = " (a second transformer pass per step)" if knob == "true_cfg_scale" else ""
        raise ValueError(
            f"{type(pipe).__name__} ignores the negative prompt unless {knob} > 1 (it is {value}): pass "
            f"{knob}=4{cost} (CLI: --pipe-arg {knob}=4), or drop the negative prompt."
        )


@dataclass
class Generated:
    """The images of a best-of-N run before scoring: per image its seed and why it is unusable (None if fine)."""

    images: list[Image.Image]
    seeds: list[int]
    errors: list[str | None]


def generate_candidates(
    pipe,
    prompt: str,
    n: int,
    batch_size: int = 4,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    generator_device: str | torch.device = "cpu",
    progress=None,
    **pipe_kwargs,
) -> Generated:
    """The generation half of `best_of_n` (see there)."""
    for owned in ("generator", "num_images_per_prompt", "prompt"):
        if owned in pipe_kwargs:
            raise TypeError(f"best_of_n sets {owned!r} itself (one generator per image from the seeds); remove it.")
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be at least 1, got n={n}, batch_size={batch_size}.")
    check_negative_prompt(pipe, pipe_kwargs)
    seed_list = _seed_list(n, seed, seeds)
    images: list[Image.Image] = []
    errors: list[str | None] = []
    for start in range(0, n, batch_size):
        chunk = seed_list[start : start + batch_size]
        generators = [torch.Generator(generator_device).manual_seed(s) for s in chunk]
        batch_kwargs = dict(pipe_kwargs)
        if isinstance(batch_kwargs.get("negative_prompt"), str):  # pipelines want one per prompt in a batch
            batch_kwargs["negative_prompt"] = [batch_kwargs["negative_prompt"]] * len(chunk)
        output = pipe(prompt=[prompt] * len(chunk), generator=generators, **batch_kwargs)
        batch_images, batch_errors = pil_images_from_output(output.images)
        images.extend(batch_images)
        errors.extend(batch_errors)
        if progress is not None:
            progress(len(chunk))
    return Generated(images, seed_list, errors)


def rank_candidates(generated: Generated, scorer: ArtQuantScorer, batch_size: int = 4) -> list[Candidate]:
    """The scoring half of `best_of_n`: the candidates best first, unscored ones last."""
    images, errors = generated.images, generated.errors
    valid = [i for i, error in enumerate(errors) if error is None]
    ratings = dict(zip(valid, scorer.score([images[i] for i in valid], batch_size=batch_size), strict=True))
    nan = float("nan")
    candidates = [
        Candidate(image, s, r.score, r.std, r.level_probs, r.error)
        if (r := ratings.get(index)) is not None
        else Candidate(image, s, nan, nan, {}, errors[index])
        for index, (image, s) in enumerate(zip(images, generated.seeds, strict=True))
    ]
    # Unscored images go last, whatever NaN would compare as.
    return sorted(candidates, key=lambda c: (c.error is None, c.score if c.error is None else 0.0), reverse=True)


def _release_accelerator_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
    offload: bool = False,
    **pipe_kwargs,
) -> list[Candidate]:
    """Generates `n` images of `prompt` with `pipe` (any diffusers text-to-image pipeline), `batch_size` at a time,
    and returns them best first.

    seeds: one per image (default `seed, seed + 1, ...`); each image's noise comes from its own generator on
        `generator_device` (CPU by default: the same seed gives the same image on any machine).
    offload: never hold both models on the accelerator: the scorer waits on the CPU while the pipeline generates,
        then the pipeline moves to the CPU and the scorer back to its device to score.
    pipe_kwargs: passed to the pipeline (num_inference_steps, guidance_scale, height, width, negative_prompt,
        true_cfg_scale, output_type, ...); a negative prompt the pipeline would ignore is refused
        (`check_negative_prompt`). `progress`: optional callable given the number of images just generated.
    """
    scorer_device = scorer.device
    if offload:
        scorer.model.to("cpu")
        _release_accelerator_memory()
    try:
        generated = generate_candidates(
            pipe, prompt, n, batch_size, seed, seeds, generator_device, progress, **pipe_kwargs
        )
    finally:
        if offload:
            pipe.to("cpu")
            _release_accelerator_memory()
            scorer.model.to(scorer_device)
    return rank_candidates(generated, scorer, batch_size)


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
        # Three significant digits whatever the preset's scale (7.35 on ArtQuant's 1-10, 0.735 on Q-ReAlign's 0-1).
        rating = f"{candidate.score:#.3g} ± {candidate.std:#.3g}" if candidate.error is None else "not scored"
        caption = f"#{index + 1}  {rating}  seed {candidate.seed}"
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
        entries.append(
            {
                "rank": rank,
                "file": name,
                "seed": candidate.seed,
                "score": candidate.score if candidate.error is None else None,  # JSON has no NaN
                "std": candidate.std if candidate.error is None else None,
                "level_probs": candidate.level_probs,
                "error": candidate.error,
            }
        )
    summary = {"prompt": prompt, "candidates": entries}
    (out / "scores.json").write_text(json.dumps(summary, indent=2))
    contact_sheet(candidates).save(out / "contact_sheet.png")
    return summary


def best_of_n_to_folder(
    pipeline_dir: str | os.PathLike,
    prompt: str,
    n: int,
    out_dir: str | os.PathLike,
    scorer: ArtQuantScorer | Callable[[], ArtQuantScorer],
    batch_size: int = 4,
    seed: int = 0,
    device: str | torch.device | None = None,
    torch_dtype: torch.dtype | None = None,
    offload: bool = False,
    **pipe_kwargs,
) -> dict[str, Any]:
    """Loads a diffusers pipeline folder (or hub id), runs `best_of_n` and writes the results to `out_dir`
    (see `write_candidates`). Returns the `scores.json` content.

    scorer: a scorer, or a function that loads one: it is then called only once the images exist.
    offload: release the pipeline once the images exist, before the scorer is loaded (with a loader) or scores:
        the two models never sit in memory together.
    """
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(pipeline_dir, torch_dtype=torch_dtype)
    pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe.set_progress_bar_config(disable=True)
    generated = generate_candidates(pipe, prompt, n, batch_size, seed, **pipe_kwargs)
    if offload:
        del pipe
        _release_accelerator_memory()
    scorer = scorer if isinstance(scorer, ArtQuantScorer) else scorer()
    candidates = rank_candidates(generated, scorer, batch_size)
    return write_candidates(candidates, out_dir, prompt)
