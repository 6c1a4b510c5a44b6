"""What the ArtQuant nodes do, as plain functions on ComfyUI's tensors (no ComfyUI import: testable without it).

IMAGE is ComfyUI's float batch [B, H, W, 3] in [0, 1]. Every image is scored on its own (quantised to 8 bits by the
scorer, as a saved file would be), so a score never depends on the rest of the batch and nothing is normalised
across the batch. Every node checks the whole batch before any model work and names every bad image at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..scorer import ImageInputError, ImageScore, Preset, load_images
from .model_handle import ArtQuantModel, comfy_module

FP16_VAE_HINT = "NaN pixels usually come from a VAE decoding in fp16: try --fp32-vae."
DESCRIBE_ERROR = "[error: "  # how `describe` marks an image it could not use, in place of its text


def check_images(images: torch.Tensor) -> None:
    """Raises one message naming every unusable image (and what to do) unless `images` is a non-empty float
    [B, H, W, 3] batch of finite values in [0, 1]."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"ArtQuant expects an IMAGE batch [B, H, W, 3], got {getattr(images, 'shape', type(images))}.")
    if images.shape[0] == 0:
        raise ValueError("The IMAGE batch is empty: connect a node that outputs at least one image.")
    channels = images.shape[-1]
    if channels != 3:
        what = "a grey (1-channel) image or a MASK" if channels == 1 else f"a {channels}-channel image (RGBA?)"
        raise ValueError(
            f"ArtQuant needs RGB IMAGEs with 3 channels, got {what} of shape {tuple(images.shape)}. Convert it to RGB "
            "first (e.g. Convert Mask to Image for a mask; drop the alpha channel with Split Image with Alpha)."
        )
    if not images.is_floating_point():
        raise ValueError(f"An IMAGE batch holds floats in [0, 1], got {images.dtype}: convert it with x.float() / 255.")
    failures = [str(item) for item in load_images(images, "BHWC") if isinstance(item, ImageInputError)]
    if failures:
        raise ValueError(
            f"{len(failures)} of {len(images)} images cannot be scored: " + " ".join(failures)
            + f" Fix or remove those images and queue again ({FP16_VAE_HINT})"
        )


def progress_reporter(total: int):
    """A callback given the number of images just finished: honours Cancel and advances ComfyUI's progress bar."""
    model_management = comfy_module("comfy.model_management")
    utils = comfy_module("comfy.utils")
    bar = utils.ProgressBar(total) if utils is not None else None

    def advance(count: int) -> None:
        if model_management is not None:
            model_management.throw_exception_if_processing_interrupted()
        if bar is not None:
            bar.update(count)

    return advance


def score_images(model: ArtQuantModel, images: torch.Tensor, batch_size: int = 8) -> list[ImageScore]:
    """One ImageScore per image of a ComfyUI batch; raises (naming every bad image) if any image cannot be scored."""
    check_images(images)
    scorer = model.ready(min(batch_size, len(images)), image_size=tuple(images.shape[1:3]))
    results = scorer.score(images, batch_size=batch_size, layout="BHWC", progress=progress_reporter(len(images)))
    failures = [f"image {i}: {r.error}" for i, r in enumerate(results) if not r.ok]
    if failures:  # the model's preprocessing refused an image, or the model failed (NaN): never pass NaN on as a score
        raise ValueError("The scorer failed on " + " ".join(failures) + " Fix those images if the message names a "
                         "problem with them; else check the checkpoint and dtype (try fp32).")
    return results


def score_report(results: list[ImageScore]) -> str:
    """A line per image with its most probable level word (the model's own answer), then the summary."""
    lines = [f"image {i}: {r.score:.3f} ± {r.std:.3f} ({max(r.level_probs, key=r.level_probs.get)})" for i, r in enumerate(results)]
    scores = [r.score for r in results]
    lines.append(f"{len(scores)} images, mean {np.mean(scores):.3f}, best {max(scores):.3f} (image {int(np.argmax(scores))})")
    return "\n".join(lines)


def reorder_latent(latent: dict, order: torch.Tensor, batch: int) -> dict:
    """The latent batch in `order`, with `batch_index` recording each item's noise index in the original batch, so a
    KSampler with the same seed regenerates the same noise for it (ComfyUI draws a batch's noise per index)."""
    samples = latent["samples"]
    if samples.shape[0] != batch:
        raise ValueError(f"The latent batch has {samples.shape[0]} items but the images {batch}: pass the matching latent.")
    original = latent.get("batch_index", list(range(batch)))
    reordered = {**latent, "samples": samples[order], "batch_index": [original[i] for i in order.tolist()]}
    if isinstance(latent.get("noise_mask"), torch.Tensor) and latent["noise_mask"].shape[0] == batch:
        reordered["noise_mask"] = latent["noise_mask"][order]
    return reordered


def reorder_mask(mask: torch.Tensor, order: torch.Tensor, batch: int) -> torch.Tensor:
    if mask.ndim == 2 or mask.shape[0] == 1:
        return mask  # one mask shared by the whole batch
    if mask.shape[0] != batch:
        raise ValueError(f"The mask batch has {mask.shape[0]} masks but the images {batch}: pass one mask per image.")
    return mask[order]


@dataclass
class Ranking:
    """A batch ranked best first: `order[i]` is the batch position of the i-th best image."""

    order: torch.Tensor
    scores: list[float]
    top_k: int

    def report(self, seed: int | None = None) -> str:
        """The winners with what re-creates each: its batch index (and the sampler's seed, when given)."""
        seed_text = f"seed {seed}, " if seed is not None else ""
        lines = [
            f"#{rank + 1}: {seed_text}batch index {index}, score {score:.3f}"
            for rank, (index, score) in enumerate(zip(self.order.tolist()[: self.top_k], self.scores))
        ]
        return "\n".join(lines)


def rank_batch(model: ArtQuantModel, images: torch.Tensor, top_k: int, batch_size: int = 8) -> Ranking:
    scores = torch.tensor([r.score for r in score_images(model, images, batch_size)], dtype=torch.float64)
    order = torch.sort(scores, descending=True, stable=True).indices  # ties keep batch order
    return Ranking(order, scores[order].tolist(), min(top_k, len(images)))


def check_threshold(threshold: float, preset: Preset) -> None:
    low, high = preset.score_range
    if not low <= threshold <= high:
        raise ValueError(
            f"threshold {threshold:g} is outside the {preset.name} preset's score range {low:g} .. {high:g}: "
            "no image could pass (or every image would). Pick a threshold inside the range."
        )


def filter_mask(scores: list[float], threshold: float) -> tuple[torch.Tensor, str]:
    """Which images reach `threshold`, and the report that says so."""
    values = torch.tensor(scores)
    keep = values >= threshold
    count = int(keep.sum())
    if count == 0:
        return keep, f"None of the {len(scores)} images reached {threshold:g} (best {values.max():.3f}); nothing passed."
    return keep, f"{count} of {len(scores)} images reached {threshold:g}: {keep.nonzero().flatten().tolist()}."


def interrupt_check():
    """ComfyUI's "raise if the user pressed Cancel" (None outside ComfyUI)."""
    model_management = comfy_module("comfy.model_management")
    return model_management.throw_exception_if_processing_interrupted if model_management is not None else None


def cancel_criteria(check_cancel):
    """A transformers stopping criterion that calls `check_cancel` (which raises to cancel) between generated tokens,
    so Cancel stops a long description within one token instead of at its end."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class CancelBetweenTokens(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            check_cancel()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([CancelBetweenTokens()])


def describe_images(model: ArtQuantModel, images: torch.Tensor, max_new_tokens: int, question: str = "",
                    check_cancel=None) -> str:
    """The descriptions of a batch (one paragraph per image); raises on bad images like the scoring nodes.
    `check_cancel` (default: ComfyUI's Cancel) is called between tokens and raises to stop."""
    check_images(images)
    scorer = model.ready(1, image_size=tuple(images.shape[1:3]))
    advance = progress_reporter(len(images))
    check_cancel = check_cancel or interrupt_check()
    extra = {"stopping_criteria": cancel_criteria(check_cancel)} if check_cancel is not None else {}
    texts = []
    for index, image in enumerate(images):  # one at a time: the progress bar moves per image
        (text,) = scorer.describe(image[None], question=question.strip() or None, max_new_tokens=max_new_tokens,
                                  layout="BHWC", **extra)
        if text.startswith(DESCRIBE_ERROR):  # the model's preprocessing refused it: raise, as the scoring nodes do
            raise ValueError(f"image {index} cannot be described: {text[len(DESCRIBE_ERROR):-1]} Fix or remove it.")
        texts.append(text)
        advance(1)
    if len(texts) == 1:
        return texts[0]
    return "\n\n".join(f"Image {i}: {text}" for i, text in enumerate(texts))


def draw_score(image: torch.Tensor, text: str) -> torch.Tensor:
    """[H, W, 3] float image -> the same with `text` on a dark box in the top-left corner."""
    picture = Image.fromarray((image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=max(10, picture.height // 16))
    margin = max(2, picture.height // 64)
    box = draw.textbbox((margin, margin), text, font=font)
    draw.rectangle((0, 0, box[2] + margin, box[3] + margin), fill=(0, 0, 0))
    draw.text((margin, margin), text, fill=(255, 255, 255), font=font)
    return torch.from_numpy(np.array(picture)).to(image.dtype) / 255


def overlay_scores(model: ArtQuantModel, images: torch.Tensor) -> torch.Tensor:
    results = score_images(model, images)
    return torch.stack([draw_score(image, f"{r.score:.2f} ± {r.std:.2f}") for image, r in zip(images, results)])
