"""ArtQuant as a reward for diffusion models, in ddpo-pytorch's contract
`fn(images, prompts, metadata) -> (rewards, info)`.

Two ways to ask for a reward, both backed by the scorer core:

* `ArtQuantReward.__call__` (and the closure `artquant_reward` returns): no gradients; images are quantised to 8 bits
  and scored exactly as `ArtQuantScorer.score` scores the same picture read from a file. For DDPO, GRPO, best-of-N.
* `ArtQuantReward.differentiable`: float pixels in, rewards with gradients to those pixels out (the scorer's torch
  preprocessing, no PIL), with activation checkpointing in the frozen scorer. For ReFL, DRaFT, AlignProp, guidance.

Image forms (batched): a torch tensor [B, 3, H, W] (float in `value_range`, or uint8), a numpy array
[B, H, W, 3] (uint8, or float in `value_range`), or a list of PIL images.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..scorer import ArtQuantScorer

NORMALIZATIONS = ("raw", "unit", "zscore")
VALUE_RANGES = ((0.0, 1.0), (-1.0, 1.0))
RANGE_SLACK = 1e-3  # the core's tolerance for float images that should lie in [0, 1]


class RunningMoments:
    """Running mean and standard deviation of every reward seen so far (Welford's update, float64)."""

    def __init__(self):
        self.count = 0
        self.mean = 0.0
        self._sum_squares = 0.0

    def update(self, values: torch.Tensor) -> None:
        for value in values.detach().double().flatten().tolist():
            self.count += 1
            delta = value - self.mean
            self.mean += delta / self.count
            self._sum_squares += delta * (value - self.mean)

    @property
    def std(self) -> float:
        return (self._sum_squares / self.count) ** 0.5 if self.count > 1 else 1.0


def _check_value_range(value_range: Sequence[float]) -> tuple[float, float]:
    value_range = tuple(float(v) for v in value_range)
    if value_range not in VALUE_RANGES:
        raise ValueError(f"value_range must be (0, 1) or (-1, 1) for float images, not {value_range}.")
    return value_range


def _range_hint(low: float, high: float) -> str:
    if -2 <= low < 0 and high <= 2 and (low < -1 or high > 1):
        return " A raw VAE decode overshoots [-1, 1]: clamp it first, as diffusers does (images.clamp(-1, 1))."
    if low >= -1 - RANGE_SLACK and low < -RANGE_SLACK and high <= 1 + RANGE_SLACK:
        return " They look like [-1, 1] (a VAE decode): pass value_range=(-1, 1)."
    if high > 1 + RANGE_SLACK and high <= 255 + RANGE_SLACK and low >= -RANGE_SLACK:
        return " They look like [0, 255]: pass uint8 images or divide by 255."
    return ""


def non_finite_rows(images: torch.Tensor) -> torch.Tensor:
    """[B] bool: which images of a batch hold a NaN or an infinity."""
    return ~torch.isfinite(images.detach()).flatten(1).all(1)


def to_unit_range(images: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """Float images in `value_range` -> the same images in [0, 1] (differentiable).

    Raises when a value is NaN/infinite or lies outside the range by more than rounding (1e-3 in [0, 1] units).
    """
    low, high = value_range
    unit = images if value_range == (0.0, 1.0) else (images - low) / (high - low)
    unit_low, unit_high = (float(v) for v in torch.aminmax(unit.detach()))  # NaN and inf show up here too
    if not math.isfinite(unit_low) or not math.isfinite(unit_high):
        bad = non_finite_rows(images).nonzero().flatten().tolist()
        raise ValueError(f"images {bad} contain NaN or infinite values; check the sampler (e.g. fp16 VAE overflow).")
    if unit_low < -RANGE_SLACK or unit_high > 1 + RANGE_SLACK:
        seen_low, seen_high = float(images.detach().min()), float(images.detach().max())
        raise ValueError(
            f"float images must lie in {value_range}, got values in [{seen_low:.3g}, {seen_high:.3g}]."
            + _range_hint(seen_low, seen_high)
        )
    return unit.clamp(0, 1)


def _batch_channels_first(array: torch.Tensor, layout: str) -> torch.Tensor:
    """[B, 3, H, W] from a batch in `layout` ("NCHW" or "NHWC"); explains a wrong layout or shape."""
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout must be 'NCHW' or 'NHWC', not {layout!r}.")
    if array.ndim != 4:
        raise ValueError(
            f"expected a batch of images [B, C, H, W] (torch) or [B, H, W, C] (numpy), got shape "
            f"{tuple(array.shape)}; add the batch dimension with images[None] for a single image."
        )
    channel_axis = 1 if layout == "NCHW" else 3
    if array.shape[channel_axis] != 3:
        other = "NHWC" if layout == "NCHW" else "NCHW"
        other_axis = 3 if layout == "NCHW" else 1
        hint = f" It looks {other}: pass layout={other!r}." if array.shape[other_axis] == 3 else ""
        raise ValueError(
            f"expected {layout} RGB images (3 channels in dim {channel_axis}), got shape {tuple(array.shape)}.{hint}"
        )
    return array if layout == "NCHW" else array.permute(0, 3, 1, 2)


ERROR_MODES = ("raise", "nan", "fallback")


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether training mode would drop anything: a Dropout module, or an attention layer's dropout rate (which
    mPLUG-Owl2's and transformers' attention layers keep as `attention_dropout`, whatever the config nesting)."""
    return any(
        (isinstance(module, torch.nn.Dropout) and module.p > 0) or getattr(module, "attention_dropout", 0) > 0
        for module in model.modules()
    )


def device_scope(device: torch.device):
    """Makes `device` the current CUDA device of the calling thread for the block (a no-op off CUDA).

    CUDA's current device is per thread: RL trainers call rewards from executor threads, where it is device 0
    whatever the process's own GPU is, so anything allocated on plain "cuda" would land on the wrong GPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """`device` with an explicit index for CUDA ("cuda" -> "cuda:N", N the calling thread's current device), so that
    a reward built in the main thread keeps using that GPU from any thread."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class ArtQuantReward:
    """The ArtQuant score as a reward: `reward(images, prompts, metadata) -> (rewards [B], info)`.

    normalize: "raw" (the score on the preset's scale: 1-10 for ArtQuant, 0-1 for Q-ReAlign), "unit" (mapped to
        [0, 1] by the preset's `score_range`) or "zscore" (minus the running mean of the rewards recorded so far,
        divided by their running std; before two are recorded it is the raw score). Rewards are recorded only by
        calls with `update_stats=True`, so evaluation, guidance and logging never move the statistics.
    value_range: what float images mean, (0, 1) or (-1, 1); uint8 images and PIL images are always [0, 255].
    errors: what an image that cannot be scored (NaN pixels, unreadable, ...) gets; the others always keep their
        rewards. "raise": an error naming it; "nan": NaN; "fallback": the value `fallback` (RL trainers: one NaN in a
        group would turn every advantage of the group into NaN). The reason is in `info["errors"]` either way.
    fallback: the reward, in the output's normalisation, of an unscorable image with errors="fallback"; default:
        the lowest reward the preset can give (raw: 1.0 for ArtQuant, 0.0 for Q-ReAlign; unit: 0.0; zscore: the
        lowest score normalised with the statistics of the moment).
    gradient_checkpointing: recompute the scorer's layer activations in the backward pass of `differentiable`
        instead of storing them (one layer's activations at a time instead of all, for one more forward pass).

    The scorer is frozen (`requires_grad=False` on every parameter) in place. Every call runs with the scorer's
    CUDA device current in the calling thread (see `device_scope`).
    """

    def __init__(
        self,
        scorer: ArtQuantScorer,
        normalize: str = "raw",
        value_range: Sequence[float] = (0, 1),
        batch_size: int = 8,
        errors: str = "raise",
        gradient_checkpointing: bool = True,
        fallback: float | None = None,
    ):
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, not {normalize!r}.")
        if errors not in ERROR_MODES:
            raise ValueError(f"errors must be one of {ERROR_MODES}, not {errors!r}.")
        if fallback is not None and not math.isfinite(fallback):
            raise ValueError(f"fallback must be a finite number, not {fallback!r}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}.")
        self.scorer = scorer
        self.normalize = normalize
        self.value_range = _check_value_range(value_range)
        self.batch_size = batch_size
        self.errors = errors
        self.fallback = fallback
        self.gradient_checkpointing = gradient_checkpointing
        self.moments = RunningMoments()
        scorer.model.requires_grad_(False)
        self._checkpointing_ready = False

    @property
    def device(self) -> torch.device:
        return torch.device(self.scorer.device)

    # ----------------------------------------------------------------------------------------------------------
    # ddpo-pytorch / flow_grpo contract (no gradients)
    # ----------------------------------------------------------------------------------------------------------
    def __call__(
        self,
        images: Any,
        prompts: Sequence[str] | None = None,
        metadata: Any = None,
        layout: str | None = None,
        update_stats: bool = False,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Rewards [B] (float32, CPU) and `info` with the raw `score` [B], its `std` [B] (uncertainty, score units),
        `level_probs` [B, 5], `level_names` and `errors` (one entry per image, None when it scored).

        `layout`: "NCHW" or "NHWC"; default NCHW for torch tensors and NHWC for numpy arrays, as ddpo-pytorch passes
        them. Prompts and metadata are not used: ArtQuant rates the image alone. `update_stats`: record these
        rewards in the zscore statistics (training calls), before normalising them.
        """
        inputs = self._scorer_inputs(images, layout)
        layout_for_scorer = "BCHW" if isinstance(inputs, torch.Tensor) and inputs.ndim == 4 else "auto"
        with device_scope(self.device):
            results = self.scorer.score(inputs, batch_size=self.batch_size, layout=layout_for_scorer)
        errors = [r.error for r in results]
        failed = [i for i, error in enumerate(errors) if error is not None]
        if failed and self.errors == "raise":
            reasons = "; ".join(f"image {i}: {errors[i]}" for i in failed)
            raise ValueError(
                f"{len(failed)} of {len(results)} images could not be scored ({reasons}). "
                "Pass errors='fallback' (a stated reward for them) or errors='nan' to keep the others' rewards."
            )
        scores = torch.tensor([r.score for r in results], dtype=torch.float32)
        info = {
            "score": scores,
            "std": torch.tensor([r.std for r in results], dtype=torch.float32),
            "level_probs": torch.tensor(
                [[r.level_probs.get(name, math.nan) for name in self.scorer.preset.level_names] for r in results],
                dtype=torch.float32,
            ),
            "level_names": list(self.scorer.preset.level_names),
            "errors": errors,
        }
        return self._normalized(scores, update_stats), info

    def _scorer_inputs(self, images: Any, layout: str | None) -> Any:
        """Whatever the caller passed -> what `ArtQuantScorer.score` reads the same way (uint8 or [0, 1] floats);
        what the scorer reports per image (bad PIL images, integer/bool/meta tensors, object arrays) goes as is."""
        if isinstance(images, Image.Image):
            raise ValueError("pass a list of PIL images (a batch), not a single image.")
        if isinstance(images, (list, tuple)):
            return list(images)
        if isinstance(images, np.ndarray):
            if images.dtype == object:
                return list(images)  # one item each: the scorer reports the ones it cannot read
            images, layout = torch.from_numpy(np.ascontiguousarray(images)), layout or "NHWC"
        if not isinstance(images, torch.Tensor):
            raise ValueError(
                f"images must be a torch tensor, a numpy array or a list of PIL images, not {type(images).__name__}."
            )
        batch = _batch_channels_first(images.detach(), layout or "NCHW")
        if not batch.is_floating_point() or batch.is_meta:
            return list(batch)  # uint8 scores as is; other dtypes and meta tensors are per-image errors there
        batch = batch.cpu()
        if all(math.isfinite(float(v)) for v in torch.aminmax(batch)):
            return to_unit_range(batch, self.value_range)
        nan_rows = non_finite_rows(batch)
        finite = torch.where(nan_rows[:, None, None, None], 0.0, batch)
        unit = to_unit_range(finite, self.value_range)
        # NaN images stay NaN so that the scorer reports them one by one instead of losing the whole batch.
        return torch.where(nan_rows[:, None, None, None], float("nan"), unit)

    # ----------------------------------------------------------------------------------------------------------
    # Differentiable reward (ReFL / DRaFT / AlignProp / guidance)
    # ----------------------------------------------------------------------------------------------------------
    def differentiable(
        self, images: torch.Tensor, value_range: Sequence[float] | None = None, update_stats: bool = False
    ) -> torch.Tensor:
        """Rewards [B] with autograd back to `images`, float [B, 3, H, W] in `value_range` (default: the reward's).

        Values outside the range raise (clamp a raw VAE decode first, as diffusers' postprocessing does). An image
        with NaN/infinite pixels raises with errors="raise", else gets NaN or the fallback (no gradient) while the
        others keep theirs. Use `-reward.differentiable(x).mean()` as a loss.
        """
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise ValueError(
                "differentiable() takes float torch images [B, 3, H, W]; convert uint8/PIL images to "
                "float first (they carry no gradient anyway)."
            )
        value_range = self.value_range if value_range is None else _check_value_range(value_range)
        images = _batch_channels_first(images, "NCHW")
        bad = non_finite_rows(images)
        if bad.any() and self.errors != "raise":
            images = torch.where(bad[:, None, None, None], (value_range[0] + value_range[1]) / 2, images)
        unit = to_unit_range(images, value_range)
        self._prepare_for_gradients()
        with device_scope(self.device):
            scores = self.scorer.score_tensor(unit.to(self.device)).scores
        scores = torch.where(bad.to(scores.device), math.nan, scores)
        return self._normalized(scores, update_stats)

    def _prepare_for_gradients(self) -> None:
        if self._checkpointing_ready or not self.gradient_checkpointing:
            return
        model = self.scorer.model
        # transformers checkpoints a layer only in training mode; with no active dropout that changes nothing else.
        if has_dropout(model):
            raise ValueError("the scorer has active dropout; pass gradient_checkpointing=False.")
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        # Checkpointed layers drop a key/value cache in training mode, so the scorer's cached prompt prefix
        # would no longer line up with its attention mask.
        if hasattr(self.scorer, "prefix_caching"):
            self.scorer.prefix_caching = False
        self._checkpointing_ready = True

    def _normalized(self, scores: torch.Tensor, update_stats: bool) -> torch.Tensor:
        """Scores -> rewards in the chosen normalisation; unscored (NaN) entries get NaN or the fallback."""
        finite = torch.isfinite(scores)
        if self.normalize == "zscore" and update_stats:
            self.moments.update(scores[finite])
        rewards = self._normalize_values(scores)
        if self.errors == "fallback" and not bool(finite.all()):
            rewards = torch.where(finite, rewards, self.fallback_reward())
        return rewards

    def _normalize_values(self, scores: torch.Tensor) -> torch.Tensor:
        if self.normalize == "unit":
            low, high = self.scorer.preset.score_range
            return (scores - low) / (high - low)
        if self.normalize == "zscore":
            return (scores - self.moments.mean) / max(self.moments.std, 1e-6)
        return scores

    def fallback_reward(self) -> float:
        """The reward of an unscorable image with errors="fallback" (see the class's `fallback`)."""
        if self.fallback is not None:
            return float(self.fallback)
        lowest = torch.tensor([float(min(self.scorer.preset.score_range))], dtype=torch.float64)
        return float(self._normalize_values(lowest)[0])


def artquant_reward(
    scorer: ArtQuantScorer | None = None,
    normalize: str = "raw",
    value_range: Sequence[float] = (0, 1),
    batch_size: int = 8,
    errors: str = "raise",
    fallback: float | None = None,
    update_stats: bool = True,
    **scorer_kwargs,
):
    """ddpo-pytorch-style reward factory: loads the scorer once (unless given) and returns
    `fn(images, prompts, metadata) -> (rewards [B], info)`. `scorer_kwargs` go to `ArtQuantScorer.from_pretrained`
    (model, base, preset, dtype, device). `update_stats`: this closure is a training reward, so its calls record
    zscore statistics; build the evaluation closure with False. See `ArtQuantReward` for the other arguments."""
    if scorer is None:
        scorer_kwargs["device"] = resolve_device(scorer_kwargs.get("device"))
        scorer = ArtQuantScorer.from_pretrained(**scorer_kwargs)
    reward = ArtQuantReward(scorer, normalize, value_range, batch_size, errors, fallback=fallback)

    def _fn(images, prompts, metadata):
        return reward(images, prompts, metadata, update_stats=update_stats)

    return _fn
