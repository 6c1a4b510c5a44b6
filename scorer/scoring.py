"""ArtQuantScorer: images in, aesthetic scores (and descriptions) out."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .checkpoint import LoadedCheckpoint, load_checkpoint, resolve_device_and_dtype, save_checkpoint
from .images import ImageInputError, load_images
from .levels import expected_score, score_std
from .presets import Preset, get_preset
from .preprocessing import pixel_values_from_images


@dataclass
class ImageScore:
    """The rating of one image. `error` is set (and the numbers are NaN) when the image could not be scored."""

    score: float
    std: float
    level_probs: dict[str, float]
    open_set_mass: float | None = None
    error: str | None = None
    source: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class LevelScores:
    """Batched, differentiable output of `score_tensor`: scores [B], stds [B], level_probs [B, L]."""

    scores: torch.Tensor
    stds: torch.Tensor
    level_probs: torch.Tensor
    open_set_mass: torch.Tensor | None = field(default=None)


def _source_names(images: Any, count: int) -> list[str | None]:
    """The file name behind each loaded image, where the inputs were paths."""
    items = [images] if isinstance(images, (str, os.PathLike)) else images
    if isinstance(items, (list, tuple)) and len(items) == count:
        return [str(x) if isinstance(x, (str, os.PathLike)) else None for x in items]
    return [None] * count


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class ArtQuantScorer:
    """An mPLUG-Owl2 level-token scorer (ArtQuant by default).

    >>> scorer = ArtQuantScorer.from_pretrained()              # Liuuuu123/ArtQuant on mPLUG-Owl2, downloaded once
    >>> [r.score for r in scorer.score(["a.png", "b.jpg"])]    # 1 (bad) .. 10 (excellent)
    """

    def __init__(self, checkpoint: LoadedCheckpoint, preset: Preset, device: torch.device, dtype: torch.dtype):
        self.model = checkpoint.model
        self.tokenizer = checkpoint.tokenizer
        self.image_config = checkpoint.image_config
        self.preset = preset
        self.device = device
        self.dtype = dtype
        self.source = checkpoint.source
        self.prompt_ids = torch.tensor(self.tokenizer.encode_with_images(preset.prompt()), device=device)
        self.level_ids = torch.tensor([self.tokenizer.word_token_id(w) for w in preset.level_names], device=device)

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike | None = None,
        base: str | os.PathLike | None = None,
        preset: str | Preset = "artquant",
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        merge_lora: bool = True,
        quantization: str | None = None,
    ) -> ArtQuantScorer:
        """`model`: a checkpoint folder or Hugging Face id (default: the preset's); a LoRA release is applied on
        `base` (default: its recorded base, else the preset's) and merged unless `merge_lora=False`.
        `dtype`/`device` default to bf16 on a GPU and fp32 on the CPU; `quantization` "8bit"/"4bit" needs
        bitsandbytes and a CUDA GPU."""
        preset = get_preset(preset)
        device, dtype = resolve_device_and_dtype(device, dtype)
        checkpoint = load_checkpoint(
            model or preset.model_id,
            base=base if model is not None else (base or preset.base_id),
            default_base=preset.base_id,
            dtype=dtype,
            merge_lora=merge_lora,
            quantization=quantization,
        )
        if quantization is None:  # bitsandbytes places the weights itself
            checkpoint.model.to(device)
        return cls(checkpoint, preset, device, dtype)

    def save_pretrained(self, out: str | os.PathLike) -> None:
        """Writes the (merged) model as a safetensors checkpoint folder that `from_pretrained` loads without peft."""
        if hasattr(self.model, "merge_and_unload"):
            raise ValueError("This scorer holds an unmerged LoRA adapter: load it with merge_lora=True to save it.")
        save_checkpoint(LoadedCheckpoint(self.model, self.tokenizer, self.image_config, self.source), out)

    # ----------------------------------------------------------------------------------------------------------
    # Scoring
    # ----------------------------------------------------------------------------------------------------------
    def level_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, vocab] at the answer position, for CLIP-normalised `pixel_values` [B, 3, S, S]."""
        input_ids = self.prompt_ids.expand(pixel_values.shape[0], -1)
        output = self.model(
            input_ids=input_ids, pixel_values=pixel_values.to(self.device, self.dtype), logits_to_keep=1, use_cache=False
        )
        logits = output.logits[:, -1]
        return logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32, or fp64 for a float64 model

    def scores_from_logits(self, logits: torch.Tensor, open_set: bool = False) -> LevelScores:
        level_probs = torch.softmax(logits[:, self.level_ids], dim=-1)
        weights = self.preset.level_weights
        open_set_mass = torch.softmax(logits, dim=-1)[:, self.level_ids].sum(-1) if open_set else None
        return LevelScores(expected_score(level_probs, weights), score_std(level_probs, weights), level_probs, open_set_mass)

    def score_tensor(self, images: torch.Tensor, open_set: bool = False) -> LevelScores:
        """Differentiable scores of float RGB images [B, 3, H, W] in [0, 1] (any size; padded and resized in torch).

        The autograd graph is kept: `score_tensor(x).scores.sum().backward()` gives d(score)/d(pixels).
        """
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"score_tensor expects float RGB images [B, 3, H, W] in [0, 1], got {images.dtype} {tuple(images.shape)}.")
        if images.shape[0] == 0:
            raise ValueError("score_tensor got an empty batch.")
        if not torch.isfinite(images).all():
            raise ValueError("score_tensor got NaN or infinite pixel values.")
        pixel_values = pixel_values_from_images(images, self.image_config)
        return self.scores_from_logits(self.level_logits(pixel_values), open_set)

    def score(
        self,
        images: Any,
        batch_size: int = 8,
        open_set: bool = False,
        layout: str = "auto",
        progress=None,
    ) -> list[ImageScore]:
        """Scores paths, PIL images, numpy HWC arrays, torch [B]CHW tensors in [0, 1] (or uint8) and ComfyUI BHWC
        batches. One `ImageScore` per image, in order; an unreadable image gets `error` and the rest still score.

        Float images are quantised to 8 bits first, so a picture scores the same as a file or as a tensor.
        `progress`: an optional callable given the number of images just finished.
        """
        loaded = load_images(images, layout)
        sources = _source_names(images, len(loaded))
        results: list[ImageScore | None] = [None] * len(loaded)
        for index, item in enumerate(loaded):
            if isinstance(item, ImageInputError):
                results[index] = self._failure(str(item), sources[index])
        valid = [i for i, item in enumerate(loaded) if results[i] is None]
        with torch.inference_mode():
            for chunk in _batches(valid, batch_size):
                output = self.scores_from_logits(self.level_logits(self._pixel_values(loaded, chunk)), open_set)
                for row, index in enumerate(chunk):
                    results[index] = ImageScore(
                        score=float(output.scores[row]),
                        std=float(output.stds[row]),
                        level_probs=dict(zip(self.preset.level_names, output.level_probs[row].tolist())),
                        open_set_mass=float(output.open_set_mass[row]) if open_set else None,
                        source=sources[index],
                    )
                if progress is not None:
                    progress(len(chunk))
        if progress is not None and len(valid) < len(loaded):
            progress(len(loaded) - len(valid))
        return results

    def _pixel_values(self, loaded: list[torch.Tensor], indices: Sequence[int]) -> torch.Tensor:
        """uint8 images of any sizes -> one batch of `pixel_values`, each image preprocessed on its own."""
        return torch.cat([pixel_values_from_images(loaded[i][None].to(self.device), self.image_config) for i in indices])

    def _failure(self, message: str, source: str | None) -> ImageScore:
        nan = float("nan")
        return ImageScore(nan, nan, dict.fromkeys(self.preset.level_names, nan), None, message, source)

    # ----------------------------------------------------------------------------------------------------------
    # Descriptions
    # ----------------------------------------------------------------------------------------------------------
    def describe(
        self,
        images: Any,
        question: str | None = None,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        batch_size: int = 4,
        layout: str = "auto",
        **generate_kwargs,
    ) -> list[str]:
        """The aesthetic description (perception, cognition, emotion) of each image, generated with the KV cache.
        Greedy unless `do_sample=True`. An image that cannot be read gets "" and a warning in its place."""
        loaded = load_images(images, layout)
        prompt_ids = torch.tensor(
            self.tokenizer.encode_with_images(self.preset.prompt(question or self.preset.describe_question, "")),
            device=self.device,
        )
        texts = [""] * len(loaded)
        valid = [i for i, item in enumerate(loaded) if not isinstance(item, ImageInputError)]
        for index, item in enumerate(loaded):
            if isinstance(item, ImageInputError):
                texts[index] = f"[error: {item}]"
        with torch.inference_mode():
            for chunk in _batches(valid, batch_size):
                pixel_values = self._pixel_values(loaded, chunk)
                generated = self.generate_from_pixels(
                    prompt_ids, pixel_values, max_new_tokens=max_new_tokens, do_sample=do_sample, **generate_kwargs
                )
                for row, index in enumerate(chunk):
                    texts[index] = self.tokenizer.decode(generated[row]).strip()
        return texts

    def generate_from_pixels(self, prompt_ids: torch.Tensor, pixel_values: torch.Tensor, **generate_kwargs) -> torch.Tensor:
        """New token ids [B, n] after `prompt_ids` (with one image placeholder) for each image in `pixel_values`."""
        network = self.model
        spliced = network.embed_multimodal(
            prompt_ids.expand(pixel_values.shape[0], -1), pixel_values.to(self.device, self.dtype)
        )
        batch, length = spliced["inputs_embeds"].shape[:2]
        attention_mask = torch.ones(batch, length, dtype=torch.long, device=self.device)
        return network.generate(
            inputs_embeds=spliced["inputs_embeds"],
            modality_indicators=spliced["modality_indicators"],
            attention_mask=attention_mask,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.eos_token_id,
            **generate_kwargs,
        )
