"""ArtQuantScorer: images in, aesthetic scores (and descriptions) out."""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .checkpoint import LoadedCheckpoint, load_checkpoint, load_image_config, resolve_device_and_dtype, save_checkpoint
from .images import DEFAULT_MAX_PIXELS
from .levels import expected_score, score_std
from .modeling_mplug_owl2 import IMAGE_TOKEN_INDEX, PromptPrefixCache
from .presets import Preset, get_preset
from .preprocessing import ImageProcessingConfig, PixelBatch, iter_pixel_batches


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


def _checkpoint_arguments(model, base, preset: Preset) -> tuple:
    """(model, base, default_base) for `load_checkpoint`: the preset's model (on its base) when none is given."""
    return model or preset.model_id, base if model is not None else (base or preset.base_id), preset.base_id


SCORER_CLASSES = {  # a preset's `family` -> (module, class) of the scorer that runs it, imported when first used
    "mplug_owl2": (".scoring", "ArtQuantScorer"),
    "qwen_vl": (".qwen_vl", "QwenVLScorer"),
}


def scorer_class(preset: str | Preset) -> type[ArtQuantScorer]:
    """The scorer class that runs `preset` (`ArtQuantScorer` for mPLUG-Owl2 presets, `QwenVLScorer` for Q-ReAlign)."""
    module, name = SCORER_CLASSES[get_preset(preset).family]
    return getattr(importlib.import_module(module, __package__), name)


CPU_BATCH_SIZE = 8  # on a CPU, bigger batches gain little and only hold more memory


def fitting_batch_size(run, limit: int) -> int:
    """The largest batch <= `limit` for which `run(batch)` does not raise `torch.OutOfMemoryError`: doubling from 1,
    then bisecting between the largest size that fitted and the smallest that did not."""
    fitted, failed, batch = 0, limit + 1, 1
    while fitted + 1 < failed:
        out_of_memory = False
        try:
            run(batch)
        except torch.OutOfMemoryError:
            out_of_memory = True  # released below, once the exception (and the frames it holds) is gone
        if out_of_memory:
            failed = batch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        else:
            fitted = batch
        batch = min(2 * batch, limit) if failed > limit else (fitted + failed) // 2
    if fitted == 0:
        raise RuntimeError(
            "Not even one image fits into the device's memory: load the scorer in bf16, with quantization='8bit', "
            "or on a device with more free memory."
        )
    return fitted


def _model_state(model: torch.nn.Module) -> tuple | None:
    """What cached keys/values depend on: each parameter's storage, dtype and in-place version counter (bumped by
    optimiser steps, merges and `copy_`). None while a parameter needs gradients: cached values would cut them off."""
    grad_enabled = torch.is_grad_enabled()
    state: list = [id(model)]
    for parameter in model.parameters():
        if grad_enabled and parameter.requires_grad:
            return None
        # Inference tensors (weights loaded under `torch.inference_mode`, as in ComfyUI) keep no version counter.
        version = 0 if parameter.is_inference() else parameter._version
        state.append((parameter.data_ptr(), parameter.dtype, parameter.device, version))
    return tuple(state)


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
        # Every image shares the prompt's text before it: its keys/values are computed once (see `_prompt_prefix`).
        self.prefix_caching = True
        self._prefix_caches: dict[tuple[int, ...], PromptPrefixCache] = {}
        self._prefix_model_state: tuple | None = None
        self._largest_batch_size: int | None = None

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
        compile: bool | dict = False,
    ) -> ArtQuantScorer:
        """`model`: a checkpoint folder or Hugging Face id (default: the preset's); a LoRA release is applied on
        `base` (default: its recorded base, else the preset's) and merged unless `merge_lora=False`.
        `dtype`/`device` default to bf16 on a GPU and fp32 on the CPU; `quantization` "8bit"/"4bit" needs
        bitsandbytes and a CUDA GPU. `compile=True` (or a dict of `torch.compile` arguments) compiles the vision
        tower, the abstractor and the LLM's layers at their first use: minutes for a 7B model, worth it for many
        batches on a GPU.

        A Q-ReAlign preset (family "qwen_vl") returns a `QwenVLScorer`: the same interface on a Qwen-VL model."""
        preset = get_preset(preset)
        family = scorer_class(preset)
        if family is not cls:
            return family.from_pretrained(model, base, preset, dtype, device, merge_lora, quantization, compile)
        device, dtype = resolve_device_and_dtype(device, dtype)
        checkpoint = cls._load(model, base, preset, dtype, device, merge_lora, quantization)
        if quantization is None:  # a no-op for the weights (loaded there); catches any buffer made elsewhere
            checkpoint.model.to(device)
        scorer = cls(checkpoint, preset, device, dtype)
        if compile:
            scorer._compile(compile if isinstance(compile, dict) else {})
        return scorer

    @classmethod
    def from_checkpoint(cls, checkpoint: LoadedCheckpoint, preset: str | Preset, device, dtype) -> ArtQuantScorer:
        """A scorer for `preset` on weights already loaded (of the preset's family): only the prompt is tokenised."""
        preset = get_preset(preset)
        return scorer_class(preset)(checkpoint, preset, torch.device(device), dtype)

    def to(self, device: str | torch.device) -> ArtQuantScorer:
        """Moves the model and the scorer's own token-id tensors to `device` (cached prompt keys/values are rebuilt
        there at the next use); returns the scorer. Quantised (bitsandbytes) weights cannot move."""
        device = torch.device(device)
        self.model.to(device)
        self.prompt_ids, self.level_ids = self.prompt_ids.to(device), self.level_ids.to(device)
        self.device = device
        return self

    @classmethod
    def _load(cls, model, base, preset: Preset, dtype, device, merge_lora, quantization) -> LoadedCheckpoint:
        return load_checkpoint(*_checkpoint_arguments(model, base, preset), dtype=dtype, merge_lora=merge_lora,
                               quantization=quantization, device=device)

    def _compile(self, options: dict) -> None:
        self.model.compile_blocks(**options)

    @staticmethod
    def load_image_config(
        model: str | os.PathLike | None = None, base: str | os.PathLike | None = None, preset: str | Preset = "artquant"
    ) -> ImageProcessingConfig:
        """The preprocessing `from_pretrained(model, base, preset)` would use, read without loading the model: for
        workers that make `pixel_values` (`image_config.pixel_values(images)`) apart from the scorer
        (`score_pixel_batch`)."""
        preset = get_preset(preset)
        return scorer_class(preset)._image_config(model, base, preset)

    @staticmethod
    def _image_config(model, base, preset: Preset) -> ImageProcessingConfig:
        return load_image_config(*_checkpoint_arguments(model, base, preset))

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
        batch = pixel_values.shape[0]
        prefix = self._prompt_prefix(self.prompt_ids)
        output = self.model(
            input_ids=self.prompt_ids[prefix.length if prefix is not None else 0 :].expand(batch, -1),
            pixel_values=pixel_values.to(self.device, self.dtype),
            cache=prefix,  # read only: every batch runs just the image and the text after it
            logits_to_keep=1,
            use_cache=False,
        )
        logits = output.logits[:, -1]
        return logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32, or fp64 for a float64 model

    def largest_batch_size(self, limit: int = 256) -> int:
        """The scoring batch size to use: on a CUDA GPU the largest that fits (found once with random images, less a
        tenth of headroom for the input pipeline, then remembered); elsewhere CPU_BATCH_SIZE."""
        if self.device.type != "cuda":
            return CPU_BATCH_SIZE
        if self._largest_batch_size is None:

            def run(batch: int) -> None:
                with torch.inference_mode():
                    self.level_logits(self.image_config.probe_pixel_values(batch, self.device, self.dtype))

            self._largest_batch_size = max(1, int(0.9 * fitting_batch_size(run, limit)))
        return self._largest_batch_size

    def _prompt_prefix(self, prompt_ids: torch.Tensor) -> PromptPrefixCache | None:
        """The keys/values of the text before the image in `prompt_ids`, computed once per prompt and model state;
        None where they cannot be reused: `prefix_caching` off, no text before the image, or a parameter that
        needs gradients (training)."""
        ids = prompt_ids.tolist()
        if not self.prefix_caching or IMAGE_TOKEN_INDEX not in ids[1:]:
            return None
        state = _model_state(self.model)
        if state is None:
            return None
        if state != self._prefix_model_state:  # moved, cast, replaced or changed in place: recompute
            self._prefix_caches, self._prefix_model_state = {}, state
        prefix = tuple(ids[: ids.index(IMAGE_TOKEN_INDEX)])
        if prefix not in self._prefix_caches:
            if len(self._prefix_caches) >= 8:  # a few prompts (scoring, descriptions) in use at a time
                self._prefix_caches.pop(next(iter(self._prefix_caches)))
            self._prefix_caches[prefix] = self.model.encode_prompt_prefix(prompt_ids[: len(prefix)])
        return self._prefix_caches[prefix]

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
        pixel_values = self.image_config.pixel_values(images)
        return self.scores_from_logits(self.level_logits(pixel_values), open_set)

    def score(
        self,
        images: Any,
        batch_size: int = 8,
        open_set: bool = False,
        layout: str = "auto",
        progress=None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        workers: int | None = None,
    ) -> list[ImageScore]:
        """Scores paths, image bytes, PIL images, numpy HWC arrays, torch [B]CHW tensors in [0, 1] (or uint8) and
        ComfyUI BHWC batches. One `ImageScore` per image (a 4-D batch counts as its images), in order, with `source`
        set where the image came from a file; a bad image gets `error` (and NaN numbers) and the rest still score.
        It never raises for a bad image. See `score_batches` for the input rules and memory bound.

        A score does not depend on the batch its image is in, up to float rounding: tested within 1e-5 in float32
        on the CPU (compare scores with a tolerance, never exactly; bf16/fp16 on a GPU differ more).
        `progress`: an optional callable given the number of images just finished. `workers`: see `score_batches`.
        """
        results: list[ImageScore] = []
        for batch in self.score_batches(images, batch_size, open_set, layout, max_pixels, workers):
            results.extend(batch)
            if progress is not None:
                progress(len(batch))
        return results

    def score_batches(
        self,
        images: Any,
        batch_size: int = 8,
        open_set: bool = False,
        layout: str = "auto",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        workers: int | None = None,
    ) -> Iterator[list[ImageScore]]:
        """`score`, one list per batch of `batch_size` consecutive images, as soon as that batch is done: images are
        decoded only when their batch is built, so memory is bounded by the batch, not by the number of inputs.

        Rules: integer images must hold 0..255 (uint16 is 16-bit), floats [0, 1]; bool, complex, object arrays and
        meta tensors are per-image errors; images over `max_pixels` (default PIL's bomb limit, ~179 MP) are refused
        from their header. Float images are quantised to 8 bits first, so a picture scores the same as a file or as
        a tensor. A model output that is not finite (NaN) is an error, never a score.

        `workers` threads (default: one per CPU, at most 8) decode and preprocess the next batch while the model
        runs on this one; the results are the same with any number (1: all in the calling thread).
        """
        batches = iter_pixel_batches(images, self.image_config, batch_size, layout, max_pixels, self.device, workers)
        for batch in batches:
            yield self.score_pixel_batch(batch, open_set)

    def score_pixel_batch(self, batch: PixelBatch, open_set: bool = False) -> list[ImageScore]:
        """One `ImageScore` per entry of `batch` (from `iter_pixel_batches`, or made elsewhere with this scorer's
        `image_config.pixel_values`): entries with an error keep it, the others are
        scored (`level_logits` + `scores_from_logits`), and a non-finite model output becomes an error.

        A batch that runs out of device memory is scored in halves (Qwen-VL's images have their own sizes, so one
        batch of large images can need far more than the batch size was chosen for); an image that does not fit even
        alone gets an error, and the others are still scored."""
        rows: list = []
        if batch.pixel_values is not None:
            with torch.inference_mode():
                rows = self._scored_rows(batch.pixel_values, open_set)
        return self._image_scores(batch, rows)

    def _scored_rows(self, pixel_values, open_set: bool) -> list:
        """(score, std, level probabilities, open-set mass) per image as Python numbers, or the error message of an
        image that does not fit into the device's memory."""
        out_of_memory = False
        try:
            output = self.scores_from_logits(self.level_logits(pixel_values), open_set)
        except torch.OutOfMemoryError:
            out_of_memory = True  # handled below, once the exception (and the activations its frames hold) is gone
        if out_of_memory:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(pixel_values) == 1:
                return [f"the image does not fit into the {self.device} device's memory even alone: downscale it, "
                        "lower max_pixels in the checkpoint's preprocessor config, or score on a larger device."]
            half = len(pixel_values) // 2
            return self._scored_rows(pixel_values[:half], open_set) + self._scored_rows(pixel_values[half:], open_set)
        open_set_mass = output.open_set_mass.tolist() if output.open_set_mass is not None else [None] * len(output.scores)
        return list(zip(output.scores.tolist(), output.stds.tolist(), output.level_probs.tolist(), open_set_mass))

    def _image_scores(self, batch: PixelBatch, rows: list) -> list[ImageScore]:
        rows = iter(rows)
        results = []
        for source, error in zip(batch.sources, batch.errors):
            if error is not None:
                results.append(self._failure(error, source))
                continue
            row = next(rows)
            if isinstance(row, str):
                results.append(self._failure(f"{source or 'image'}: {row}", source))
                continue
            score, std, level_probs, open_set_mass = row
            numbers = [score, std, *level_probs] + ([open_set_mass] if open_set_mass is not None else [])
            if not all(math.isfinite(number) for number in numbers):
                message = (f"{source or 'image'}: the model gave a non-finite (NaN or infinite) output for this image; "
                           "the checkpoint or dtype is likely broken (fp16 overflows: try bf16 or fp32).")
                results.append(self._failure(message, source))
            else:
                results.append(ImageScore(score, std, dict(zip(self.preset.level_names, level_probs)), open_set_mass,
                                          source=source))
        return results

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
        max_pixels: int = DEFAULT_MAX_PIXELS,
        workers: int | None = None,
        **generate_kwargs,
    ) -> list[str]:
        """The aesthetic description (perception, cognition, emotion) of each image, generated with the KV cache.
        Greedy unless `do_sample=True`. One string per image, in order (inputs as for `score`, decoded a batch at a
        time); an image that cannot be used gets the string "[error: <what is wrong>]" in its place, never an
        exception. `workers`: input threads, as for `score_batches`."""
        prompt_ids = self._description_prompt(question or self.preset.describe_question)
        texts: list[str] = []
        for batch in iter_pixel_batches(images, self.image_config, batch_size, layout, max_pixels, self.device, workers):
            generated = iter(())
            if batch.pixel_values is not None:
                with torch.inference_mode():
                    generated = iter(self.generate_from_pixels(
                        prompt_ids, batch.pixel_values, max_new_tokens=max_new_tokens, do_sample=do_sample,
                        **generate_kwargs,
                    ))
            texts += [f"[error: {error}]" if error else self._decode(next(generated)).strip()
                      for error in batch.errors]
        return texts

    def _description_prompt(self, question: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer.encode_with_images(self.preset.prompt(question, "")), device=self.device)

    def _decode(self, token_ids: torch.Tensor) -> str:
        return self.tokenizer.decode(token_ids)

    def generate_from_pixels(self, prompt_ids: torch.Tensor, pixel_values: torch.Tensor, **generate_kwargs) -> torch.Tensor:
        """New token ids [B, n] after `prompt_ids` (with one image placeholder) for each image in `pixel_values`."""
        network = self.model
        spliced = network.embed_multimodal(
            prompt_ids.expand(pixel_values.shape[0], -1), pixel_values.to(self.device, self.dtype)
        )
        batch, length = spliced["inputs_embeds"].shape[:2]
        attention_mask = torch.ones(batch, length, dtype=torch.long, device=self.device)
        # One sequence per image, cache on: `generate` then runs only the embeddings after the cached prefix.
        one_sequence_each = all(generate_kwargs.get(k, 1) == 1 for k in ("num_beams", "num_return_sequences"))
        if one_sequence_each and generate_kwargs.get("use_cache", True) and "generation_config" not in generate_kwargs:
            prefix = self._prompt_prefix(prompt_ids.to(self.device))
            if prefix is not None:
                generate_kwargs["cache"] = prefix.for_batch(batch)
        return network.generate(
            inputs_embeds=spliced["inputs_embeds"],
            modality_indicators=spliced["modality_indicators"],
            attention_mask=attention_mask,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.eos_token_id,
            **generate_kwargs,
        )
