"""ArtQuant nodes: load a scorer, then score, rank, filter, describe and annotate IMAGE batches.

IMAGE is ComfyUI's float batch [B, H, W, 3] in [0, 1]. Every image is scored on its own (quantised to 8 bits by the
scorer, as a saved file would be), so a score never depends on the rest of the batch and nothing is normalised
across the batch.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..scorer import PRESETS, ImageScore
from .model_handle import (
    ArtQuantModel,
    comfy_module,
    load_model,
    local_checkpoints,
    quantization_choices,
    resolve_checkpoint,
)

MODEL_TYPE = "ARTQUANT_MODEL"
CATEGORY = "ArtQuant"
MODEL_TOOLTIP = "The scorer from Load ArtQuant model (loaded once and shared)."
IMAGES_TOOLTIP = "A batch of RGB images; every image is scored on its own."
AUTO_BASE = "(recorded in the release)"
NO_LOCAL_MODEL = "(none in models/artquant: type an id below)"


def devices() -> list[str]:
    found = ["auto", "cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return found + (["mps"] if torch.backends.mps.is_available() else [])


def check_images(images: torch.Tensor) -> None:
    """Raises a message that says what to do unless `images` is a non-empty [B, H, W, 3] batch (the scorer checks
    the pixel values of each image)."""
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


def check_finite(images: torch.Tensor) -> None:
    """For the describe path, which reports unreadable images as text rather than raising."""
    bad = [i for i, image in enumerate(images) if not torch.isfinite(image).all()]
    if bad:
        raise ValueError(
            f"Images {bad} of the batch contain NaN or infinite pixels: fix or remove them and queue again "
            "(NaN pixels usually come from a VAE decoding in fp16: try --fp32-vae)."
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
    """One ImageScore per image of a ComfyUI batch; raises if any image cannot be scored."""
    check_images(images)
    scorer = model.ready()
    results = scorer.score(images, batch_size=batch_size, layout="BHWC", progress=progress_reporter(len(images)))
    failures = [r.error for r in results if not r.ok]
    if failures:
        raise ValueError(
            "Some images could not be scored: " + " ".join(failures) + " Fix or remove those images and queue again "
            "(NaN pixels usually come from a VAE decoding in fp16: try --fp32-vae)."
        )
    return results


def score_report(results: list[ImageScore]) -> str:
    """A line per image with its most probable level word (the model's own answer), then the summary."""
    lines = [f"image {i}: {r.score:.3f} ± {r.std:.3f} ({max(r.level_probs, key=r.level_probs.get)})" for i, r in enumerate(results)]
    scores = [r.score for r in results]
    lines.append(f"{len(scores)} images, mean {np.mean(scores):.3f}, best {max(scores):.3f} (image {int(np.argmax(scores))})")
    return "\n".join(lines)


def no_images(images: torch.Tensor):
    """What an IMAGE output carries when no image belongs there: inside ComfyUI an ExecutionBlocker, so the nodes
    after it are skipped (an empty batch would crash most of them); elsewhere an empty [0, H, W, 3] batch."""
    graph_utils = comfy_module("comfy_execution.graph_utils")
    return graph_utils.ExecutionBlocker(None) if graph_utils is not None else images[:0]


def images_or_block(images: torch.Tensor):
    return images if images.shape[0] > 0 else no_images(images)


class ArtQuantLoader:
    DESCRIPTION = (
        "Loads an ArtQuant (or DeQA-Score / OneAlign) scorer once and keeps it cached; ComfyUI moves it to and from "
        "the GPU like its other models. Checkpoint folders go into models/artquant/."
    )

    @classmethod
    def INPUT_TYPES(cls):
        local = local_checkpoints()
        return {
            "required": {
                "preset": (list(PRESETS), {"default": "artquant", "tooltip": "Question, level words and weights of the scorer."}),
                "model": (local or [NO_LOCAL_MODEL], {"tooltip": "A checkpoint folder in models/artquant/ (full model or ArtQuant LoRA release)."}),
                "dtype": (["auto", "bf16", "fp16", "fp32"], {"default": "auto", "tooltip": "auto: bf16 on a GPU (fp16 without bf16), fp32 on the CPU."}),
                "device": (devices(), {"default": "auto", "tooltip": "auto: ComfyUI's compute device."}),
            },
            "optional": {
                "base": ([AUTO_BASE] + local, {"tooltip": "Base model of a LoRA release; by default the one the release records."}),
                "model_id": ("STRING", {"default": "", "tooltip": "A Hugging Face id or a folder path; when set it replaces `model`."}),
                "quantization": (quantization_choices(), {"default": "none", "tooltip": "8-bit/4-bit LLM weights via bitsandbytes (CUDA only; listed when it is installed)."}),
            },
        }

    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("artquant_model",)
    OUTPUT_TOOLTIPS = ("The loaded scorer, for the other ArtQuant nodes.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, preset, model, dtype, device, base=AUTO_BASE, model_id="", quantization="none"):
        chosen = resolve_checkpoint(model_id or ("" if model == NO_LOCAL_MODEL else model))
        base_path = None if base == AUTO_BASE else resolve_checkpoint(base)
        return (load_model(chosen, base_path, preset, dtype, device, quantization),)


class ArtQuantScore:
    DESCRIPTION = "Scores every image of the batch (1 bad .. 10 excellent for ArtQuant), with its uncertainty (std)."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "artquant_model": (MODEL_TYPE, {"tooltip": MODEL_TOOLTIP}),
                "images": ("IMAGE", {"tooltip": IMAGES_TOOLTIP}),
                "batch_size": ("INT", {"default": 8, "min": 1, "max": 256, "tooltip": "Images per forward pass (memory vs speed); scores do not change."}),
            }
        }

    RETURN_TYPES = ("FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("scores", "stds", "report")
    OUTPUT_IS_LIST = (True, True, False)
    OUTPUT_TOOLTIPS = ("One score per image, in batch order.", "One std per image.", "A line per image and a summary.")
    FUNCTION = "score"
    CATEGORY = CATEGORY

    def score(self, artquant_model, images, batch_size=8):
        results = score_images(artquant_model, images, batch_size)
        return ([r.score for r in results], [r.std for r in results], score_report(results))


def reorder_latent(latent: dict, order: torch.Tensor, batch: int) -> dict:
    samples = latent["samples"]
    if samples.shape[0] != batch:
        raise ValueError(f"The latent batch has {samples.shape[0]} items but the images {batch}: pass the matching latent.")
    reordered = {**latent, "samples": samples[order]}
    if isinstance(latent.get("noise_mask"), torch.Tensor) and latent["noise_mask"].shape[0] == batch:
        reordered["noise_mask"] = latent["noise_mask"][order]
    if "batch_index" in latent:
        reordered["batch_index"] = [latent["batch_index"][i] for i in order.tolist()]
    return reordered


def reorder_mask(mask: torch.Tensor, order: torch.Tensor, batch: int) -> torch.Tensor:
    if mask.ndim == 2 or mask.shape[0] == 1:
        return mask  # one mask shared by the whole batch
    if mask.shape[0] != batch:
        raise ValueError(f"The mask batch has {mask.shape[0]} masks but the images {batch}: pass one mask per image.")
    return mask[order]


class ArtQuantRank:
    DESCRIPTION = "Sorts the batch by score, best first, and splits it into the top k and the rest."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "artquant_model": (MODEL_TYPE, {"tooltip": MODEL_TOOLTIP}),
                "images": ("IMAGE", {"tooltip": IMAGES_TOOLTIP}),
                "top_k": ("INT", {"default": 1, "min": 1, "max": 4096, "tooltip": "How many of the best images go to `top_k`."}),
            },
            "optional": {
                "latent": ("LATENT", {"tooltip": "The latents of these images; returned in the same order."}),
                "mask": ("MASK", {"tooltip": "One mask per image; returned in the same order."}),
            },
        }

    RETURN_TYPES = ("IMAGE", "IMAGE", "IMAGE", "FLOAT", "LATENT", "MASK")
    RETURN_NAMES = ("sorted", "top_k", "rest", "sorted_scores", "latent", "mask")
    OUTPUT_IS_LIST = (False, False, False, True, False, False)
    OUTPUT_TOOLTIPS = (
        "All images, best first.", "The k best.", "The others (skipped downstream when there are none).",
        "Scores in sorted order.", "The latent, sorted like the images.", "The mask, sorted like the images.",
    )
    FUNCTION = "rank"
    CATEGORY = CATEGORY

    def rank(self, artquant_model, images, top_k, latent=None, mask=None):
        scores = torch.tensor([r.score for r in score_images(artquant_model, images)], dtype=torch.float64)
        order = torch.sort(scores, descending=True, stable=True).indices  # ties keep batch order
        ranked = images[order]
        return (
            ranked,
            ranked[:top_k],
            images_or_block(ranked[top_k:]),
            scores[order].tolist(),
            reorder_latent(latent, order, len(images)) if latent is not None else None,
            reorder_mask(mask, order, len(images)) if mask is not None else None,
        )


class ArtQuantFilter:
    DESCRIPTION = (
        "Keeps the images that score at or above the threshold. When none pass, `images` carries nothing and the "
        "nodes after it are skipped; the report says so."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "artquant_model": (MODEL_TYPE, {"tooltip": MODEL_TOOLTIP}),
                "images": ("IMAGE", {"tooltip": IMAGES_TOOLTIP}),
                "threshold": ("FLOAT", {"default": 6.0, "min": -100.0, "max": 100.0, "step": 0.1, "tooltip": "Minimum score to keep (ArtQuant: 1 .. 10)."}),
            }
        }

    RETURN_TYPES = ("IMAGE", "IMAGE", "INT", "STRING")
    RETURN_NAMES = ("images", "rejected", "count", "report")
    OUTPUT_TOOLTIPS = (
        "Images with score >= threshold, in batch order (skipped downstream when none pass).",
        "The others (skipped downstream when there are none).", "How many passed.", "What passed and what did not.",
    )
    FUNCTION = "filter"
    CATEGORY = CATEGORY

    def filter(self, artquant_model, images, threshold):
        scores = torch.tensor([r.score for r in score_images(artquant_model, images)])
        keep = scores >= threshold
        count = int(keep.sum())
        if count == 0:
            report = f"None of the {len(images)} images reached {threshold:g} (best {scores.max():.3f}); nothing passed."
        else:
            report = f"{count} of {len(images)} images reached {threshold:g}: {keep.nonzero().flatten().tolist()}."
        return (images_or_block(images[keep]), images_or_block(images[~keep]), count, report)


class ArtQuantDescribe:
    DESCRIPTION = "Writes the model's aesthetic description of each image (perception, cognition, emotion)."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "artquant_model": (MODEL_TYPE, {"tooltip": MODEL_TOOLTIP}),
                "images": ("IMAGE", {"tooltip": "The images to describe, one description each."}),
                "max_new_tokens": ("INT", {"default": 256, "min": 1, "max": 2048, "tooltip": "Length limit of each description, in tokens."}),
            },
            "optional": {
                "question": ("STRING", {"multiline": True, "default": "", "tooltip": "Empty: the preset's description question."}),
            },
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("description",)
    OUTPUT_TOOLTIPS = ("The descriptions; with several images, one paragraph per image.",)
    FUNCTION = "describe"
    CATEGORY = CATEGORY

    def describe(self, artquant_model, images, max_new_tokens, question=""):
        check_images(images)
        check_finite(images)
        scorer = artquant_model.ready()
        advance = progress_reporter(len(images))
        texts = []
        for image in images:  # one at a time, so Cancel is honoured between long generations
            texts.extend(scorer.describe(image[None], question=question or None, max_new_tokens=max_new_tokens, layout="BHWC"))
            advance(1)
        if len(texts) == 1:
            return (texts[0],)
        return ("\n\n".join(f"Image {i}: {text}" for i, text in enumerate(texts)),)


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


class ArtQuantScoreOverlay:
    DESCRIPTION = "Draws each image's score and std on it, for previews and contact sheets."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "artquant_model": (MODEL_TYPE, {"tooltip": MODEL_TOOLTIP}),
                "images": ("IMAGE", {"tooltip": IMAGES_TOOLTIP}),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The images with 'score ± std' in the top-left corner.",)
    FUNCTION = "overlay"
    CATEGORY = CATEGORY

    def overlay(self, artquant_model, images):
        results = score_images(artquant_model, images)
        return (torch.stack([draw_score(image, f"{r.score:.2f} ± {r.std:.2f}") for image, r in zip(images, results)]),)


NODE_CLASS_MAPPINGS = {
    "ArtQuantLoader": ArtQuantLoader,
    "ArtQuantScore": ArtQuantScore,
    "ArtQuantRank": ArtQuantRank,
    "ArtQuantFilter": ArtQuantFilter,
    "ArtQuantDescribe": ArtQuantDescribe,
    "ArtQuantScoreOverlay": ArtQuantScoreOverlay,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "ArtQuantLoader": "Load ArtQuant model",
    "ArtQuantScore": "Score images (ArtQuant)",
    "ArtQuantRank": "Rank images (ArtQuant)",
    "ArtQuantFilter": "Filter by score (ArtQuant)",
    "ArtQuantDescribe": "Describe image (ArtQuant)",
    "ArtQuantScoreOverlay": "Score overlay (ArtQuant)",
}
