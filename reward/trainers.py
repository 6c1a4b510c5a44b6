"""ArtQuant in the calling conventions of the diffusion RL trainers, so that no glue code is needed.

| trainer | what it calls | here |
| --- | --- | --- |
| ddpo-pytorch, trl DDPO | `fn(images, prompts, metadata) -> (rewards, info)` | `artquant_reward(...)` |
| trl DDPO, `async_reward_computation=True` | the same, returning two futures | `async_reward(...)` |
| trl AlignProp | the same, rewards differentiable to the images | `alignprop_reward(...)` |
| flow_grpo, DiffusionNFT (`multi_score`'s registry) | `score_functions[name](device)` -> `fn(images, prompts, metadata) -> (scores, info)` | `flow_grpo_score` |
| flow_grpo, DiffusionNFT (in place of `multi_score`) | `fn(images, prompts, metadata, only_strict=...) -> ({name: scores, "avg": scores}, {})` | `flow_grpo_reward(device)` |
| Flow-Factory | `cls(config, accelerator)`, then `model(prompt=[...], image=[PIL])` -> `.rewards` | `FlowFactoryReward` |

The non-differentiable adapters default to errors="fallback": an image that cannot be scored gets the fallback
reward (see `ArtQuantReward`) and its reason in the info, instead of ending the run or turning its group's
advantages into NaN. The zscore statistics move only in training calls (flow_grpo's `only_strict=True`, every
call of the others), never in evaluation. The scorer stays on the device each adapter resolved when it was built,
whichever thread calls it.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..scorer import ArtQuantScorer
from .functions import ArtQuantReward, resolve_device


def _reward(
    scorer: ArtQuantScorer | None, device, normalize: str, errors: str, fallback: float | None, value_range, **scorer_kwargs
) -> ArtQuantReward:
    """An `ArtQuantReward` on `device` (CUDA resolved to this thread's GPU), loading the scorer unless given."""
    if scorer is None:
        scorer = ArtQuantScorer.from_pretrained(device=resolve_device(device), **scorer_kwargs)
    return ArtQuantReward(scorer, normalize=normalize, value_range=value_range, errors=errors, fallback=fallback)


def flow_grpo_score(
    device: str | torch.device | None = None,
    scorer: ArtQuantScorer | None = None,
    normalize: str = "raw",
    errors: str = "fallback",
    fallback: float | None = None,
    **scorer_kwargs,
):
    """For flow_grpo's / DiffusionNFT's `multi_score` registry: `multi_score` calls `flow_grpo_score(device)` once,
    then `fn(images, prompts, metadata) -> (scores, {})` with scores a float32 numpy array [B]. Images: their
    `output_type="pt"` tensors [B, 3, H, W] in [0, 1] (or numpy NHWC uint8). `scorer_kwargs` go to
    `ArtQuantScorer.from_pretrained` (model, preset, dtype, ...). Registered this way no zscore statistics move
    (`multi_score` does not say which calls are training): GRPO normalises rewards per group anyway."""
    reward = _reward(scorer, device, normalize, errors, fallback, (0, 1), **scorer_kwargs)

    def _fn(images, prompts, metadata):
        rewards, info = reward(images, prompts, metadata)
        return rewards.numpy(), {"artquant_errors": info["errors"]}

    return _fn


def flow_grpo_reward(
    device: str | torch.device | None = None,
    scorer: ArtQuantScorer | None = None,
    name: str = "artquant",
    normalize: str = "raw",
    errors: str = "fallback",
    fallback: float | None = None,
    **scorer_kwargs,
):
    """In place of flow_grpo's `multi_score(device, {"artquant": 1.0})`: `fn(images, prompts, metadata,
    only_strict=True) -> ({name: scores, "avg": scores}, {name + "_errors": [...]})`, scores float32 numpy [B].
    `only_strict=True` is how flow_grpo marks a training call: only those update zscore statistics."""
    reward = _reward(scorer, device, normalize, errors, fallback, (0, 1), **scorer_kwargs)

    def _fn(images, prompts, metadata, ref_images=None, only_strict=True):
        rewards, info = reward(images, prompts, metadata, update_stats=only_strict)
        scores = rewards.numpy()
        return {name: scores, "avg": scores.copy()}, {f"{name}_errors": info["errors"]}

    return _fn


def async_reward(
    reward: ArtQuantReward,
    executor: concurrent.futures.Executor | None = None,
    update_stats: bool = True,
):
    """trl DDPO's `async_reward_computation=True` contract: `fn(images, prompts, metadata) -> (future rewards,
    future info)`; trl calls it from its own executor and waits on both `.result()`s. The scoring runs on
    `executor` (default: one worker of its own, so calls keep their order and share one model)."""
    executor = executor or concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="artquant")

    def _fn(images, prompts, metadata):
        if isinstance(images, torch.Tensor):
            images = images.detach().clone()  # the trainer may reuse its buffer before scoring runs
        both = executor.submit(reward, images, prompts, metadata, update_stats=update_stats)
        rewards, info = concurrent.futures.Future(), concurrent.futures.Future()

        def split(done: concurrent.futures.Future) -> None:
            if done.exception() is not None:
                rewards.set_exception(done.exception())
                info.set_exception(done.exception())
            else:
                rewards.set_result(done.result()[0])
                info.set_result(done.result()[1])

        both.add_done_callback(split)
        return rewards, info

    return _fn


def alignprop_reward(reward: ArtQuantReward, value_range: Sequence[float] = (0, 1), update_stats: bool = True):
    """trl AlignProp's `reward_function(images, prompts, metadata) -> (rewards, info)` with rewards [B] that carry
    gradients to `images` (its `output_type="pt"` images, [B, 3, H, W] in [0, 1]). AlignProp's loss is
    `10.0 - rewards.mean()`: a constant offset, so any preset's scale (1-10 ArtQuant, 0-1 Q-ReAlign) gives the same
    gradients."""

    def _fn(images, prompts, metadata):
        rewards = reward.differentiable(images, value_range=value_range, update_stats=update_stats)
        return rewards, {"score": rewards.detach()}

    return _fn


@dataclass
class RewardOutput:
    """Flow-Factory's reward output: per-sample `rewards` [B] and `extra_info`."""

    rewards: torch.Tensor
    extra_info: dict[str, Any] = field(default_factory=dict)


class FlowFactoryReward:
    """A Flow-Factory pointwise reward model. In its YAML:

        rewards:
          - name: "artquant"
            reward_model: "artquant.reward.FlowFactoryReward"
            model: "Liuuuu123/ArtQuant"   # optional: goes to extra_kwargs (also preset, normalize, errors, fallback)
            # preset: "qrealign-mini-quality"   # any preset, Q-ReAlign's included (scores 0..1)

    Flow-Factory builds it as `FlowFactoryReward(config, accelerator)` and calls `model(prompt=[...], image=[PIL])`.
    The device is the accelerator's when the config says plain "cuda" (as Flow-Factory's own models do).
    """

    required_fields = ("image", "prompt")
    use_tensor_inputs = False

    def __init__(self, config, accelerator=None, scorer: ArtQuantScorer | None = None):
        self.config = config
        device = torch.device(getattr(config, "device", "cpu"))
        if accelerator is not None and device == torch.device("cuda"):
            device = accelerator.device
        self.device = resolve_device(device)
        extra = dict(getattr(config, "extra_kwargs", None) or {})
        reward_options = {key: extra.pop(key) for key in ("normalize", "errors", "fallback") if key in extra}
        if scorer is None:
            dtype = getattr(config, "dtype", None)
            scorer = ArtQuantScorer.from_pretrained(device=self.device, dtype=dtype, **extra)
        self.reward = ArtQuantReward(
            scorer,
            normalize=reward_options.get("normalize", "raw"),
            errors=reward_options.get("errors", "fallback"),
            fallback=reward_options.get("fallback"),
            batch_size=int(getattr(config, "batch_size", 8)),
        )
        self.model = scorer.model

    @torch.no_grad()
    def __call__(self, prompt: list[str], image: list | None = None) -> RewardOutput:
        if image is None:
            raise ValueError("ArtQuant rates images: Flow-Factory passed no `image` field.")
        if len(image) != len(prompt):
            raise ValueError(f"got {len(image)} images for {len(prompt)} prompts; pass one image per prompt.")
        rewards, info = self.reward(list(image), list(prompt), None, update_stats=True)
        return RewardOutput(
            rewards=rewards.to(self.device),
            extra_info={"score": info["score"].tolist(), "std": info["std"].tolist(), "errors": info["errors"]},
        )

    def to(self, device) -> FlowFactoryReward:
        self.device = resolve_device(device)
        self.reward.scorer.to(self.device)
        return self
