"""Reward guidance: steer what a diffusers pipeline samples up the ArtQuant gradient, for every pipeline family.

One mechanism for all of them. While attached, the guidance sits inside the pipeline's own `scheduler.step`, which
every diffusers loop calls once a step with the (classifier-free guided) model output, the timestep and the latents
x_t. At a guided step it

1. predicts the clean latents x0 from x_t and the model output, with the coefficients of `X0_FORMULAS` and the noise
   level of `NOISE_LEVELS` (how x_t mixes x0 and noise under this scheduler),
2. decodes x0 with the pipeline's VAE (unpacking Flux's 2 x 2 patches first) and takes d reward / d x0,
3. moves x0 by `scale * d reward / d x0` by adjusting the model output (x0 is linear in it), then lets the scheduler
   step as usual.

Because the nudge goes through the model output, the scheduler's own update carries it (multistep history
included), the step runs on the timesteps the pipeline actually uses (img2img with strength < 1, inpaint with 4 or
9 UNet channels, SDXL's added conditioning, SD3's and Flux's transformers alike) and no extra denoiser call is made.

>>> guidance = RewardGuidance(ArtQuantReward(scorer), scale=0.5, start=10)
>>> with guidance.attached(pipe):
...     image = pipe(prompt).images[0]
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .functions import ArtQuantReward

# How x_t = signal * x0 + noise * eps holds for the latents each scheduler steps, read from its own schedule:
#   "alphas_cumprod": variance preserving, by timestep (signal^2 = alpha_bar_t)
#   "sigmas":         x_t = x0 + sigma * eps (k-diffusion style, unscaled latents; the UNet sees x_t / sqrt(sigma^2 + 1))
#   "vp_sigmas":      variance preserving, sigma = noise / signal (DPM-Solver++); flow sigmas when use_flow_sigmas
#   "flow_sigmas":    rectified flow, x_t = (1 - sigma) x0 + sigma * noise
NOISE_LEVELS = {
    "DDIMScheduler": "alphas_cumprod",
    "DDPMScheduler": "alphas_cumprod",
    "EulerDiscreteScheduler": "sigmas",
    "EulerAncestralDiscreteScheduler": "sigmas",
    "LMSDiscreteScheduler": "sigmas",
    "DPMSolverMultistepScheduler": "vp_sigmas",
    "FlowMatchEulerDiscreteScheduler": "flow_sigmas",
}

# x0 = a * x_t + b * model_output for each prediction type, from the noise level (signal, noise).
X0_FORMULAS = {
    "epsilon": lambda signal, noise: (1 / signal, -noise / signal),
    # v = signal * eps - noise * x0 on the unit-variance input x_t / sqrt(signal^2 + noise^2).
    "v_prediction": lambda signal, noise: (signal / (signal**2 + noise**2), -noise / math.sqrt(signal**2 + noise**2)),
    "sample": lambda signal, noise: (0.0, 1.0),
    "flow_prediction": lambda signal, noise: (1.0, -noise),  # v = noise - x0 with signal = 1 - sigma
}

UNET_SCHEDULERS = "DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler or DPMSolverMultistepScheduler"
# Why a scheduler is refused, and what to use instead.
REFUSED = {
    "PNDMScheduler": "PNDM steps from samples it stored earlier, which would drop part of each nudge; DDIM "
    "samples the same model as well: pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)",
    "UniPCMultistepScheduler": "UniPC's corrector rebuilds each step from the previous sample; use DPM-Solver++: "
    "pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)",
    "HeunDiscreteScheduler": "second-order schedulers call the model twice a step; use "
    "pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)",
    "KDPM2DiscreteScheduler": "second-order schedulers call the model twice a step; use "
    "pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)",
    "KDPM2AncestralDiscreteScheduler": "second-order schedulers call the model twice a step; use "
    "pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)",
    "FlowMatchHeunDiscreteScheduler": "second-order schedulers call the model twice a step; use "
    "pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)",
}


@dataclass(frozen=True)
class NoiseLevel:
    """x_t = signal * x0 + noise * eps at one step, and what the model predicts there."""

    signal: float
    noise: float
    prediction_type: str

    def x0_coefficients(self) -> tuple[float, float]:
        """(a, b) with x0 = a * x_t + b * model_output."""
        return X0_FORMULAS[self.prediction_type](self.signal, self.noise)


def _flow_matching_pipeline(pipe) -> bool:
    """Whether the pipeline class declares a flow-matching scheduler (SD3, Flux, ...)."""
    annotation = inspect.signature(type(pipe).__init__).parameters.get("scheduler")
    return annotation is not None and "FlowMatch" in str(annotation.annotation)


def schedule_kind(pipe) -> str:
    """The `NOISE_LEVELS` entry of `pipe.scheduler`; raises with advice that fits the pipeline when there is none."""
    scheduler = pipe.scheduler
    name = type(scheduler).__name__
    kind = NOISE_LEVELS.get(name)
    if kind == "vp_sigmas" and scheduler.config.get("use_flow_sigmas"):
        kind = "flow_sigmas"
    flow_pipeline = _flow_matching_pipeline(pipe)
    if flow_pipeline and kind not in (None, "flow_sigmas"):
        raise ValueError(
            f"{type(pipe).__name__} samples by flow matching; {name} does not. Use its own scheduler: "
            "pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)."
        )
    if kind is None:
        advice = REFUSED.get(name) or (
            "use pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)"
            if flow_pipeline or "FlowMatch" in name
            else f"swap in one of {UNET_SCHEDULERS} with .from_config(pipe.scheduler.config)"
        )
        raise ValueError(f"reward guidance does not support {name}: {advice}.")
    prediction_type = prediction_type_of(scheduler, kind)
    if prediction_type not in X0_FORMULAS or (prediction_type == "flow_prediction") != (kind == "flow_sigmas"):
        raise ValueError(
            f"reward guidance cannot predict x0 for prediction_type {prediction_type!r} with {name}; "
            f"supported: epsilon, v_prediction and sample (UNets), flow_prediction (flow matching)."
        )
    return kind


def prediction_type_of(scheduler, kind: str) -> str:
    if kind == "flow_sigmas" and "prediction_type" not in scheduler.config:
        return "flow_prediction"  # FlowMatchEulerDiscreteScheduler has no such option: it is always velocity
    return scheduler.config.get("prediction_type", "epsilon")


def _step_index(scheduler, timestep) -> int:
    """Where the scheduler is in its sigmas when `step(..., timestep, ...)` is about to run (as it finds it itself)."""
    if scheduler.step_index is not None:
        return scheduler.step_index
    if scheduler.begin_index is not None:
        return scheduler.begin_index
    return scheduler.index_for_timestep(timestep)


def noise_level(scheduler, kind: str, timestep) -> NoiseLevel:
    """The noise level of the latents that `scheduler.step(model_output, timestep, latents)` is about to step."""
    prediction_type = prediction_type_of(scheduler, kind)
    if kind == "alphas_cumprod":
        alpha_bar = float(scheduler.alphas_cumprod[int(timestep)])
        return NoiseLevel(math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar), prediction_type)
    sigma = float(scheduler.sigmas[_step_index(scheduler, timestep)])
    if kind == "sigmas":
        return NoiseLevel(1.0, sigma, prediction_type)
    if kind == "vp_sigmas":
        signal = 1 / math.sqrt(sigma**2 + 1)
        return NoiseLevel(signal, sigma * signal, prediction_type)
    return NoiseLevel(1 - sigma, sigma, prediction_type)


def predict_clean_latents(latents: torch.Tensor, model_output: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
    """x0 from x_t = `latents` and the model's output at noise `level`; differentiable in both."""
    a, b = level.x0_coefficients()
    return a * latents + b * model_output


def decode_latents(pipe, latents: torch.Tensor, latent_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Images [B, 3, H, W] in about [-1, 1] (not clamped) from clean latents as the pipeline holds them, with autograd.

    Packed latents [B, tokens, channels] (Flux) are unpacked first; `latent_grid` is their (rows, columns) of 2 x 2
    patches. The VAE's scaling, shift and per-channel statistics are undone as the pipelines do before decoding.
    """
    vae = pipe.vae
    if latents.ndim == 3:
        if latent_grid is None:
            raise ValueError("packed latents need their latent_grid (rows, columns of 2 x 2 patches) to unpack.")
        rows, columns = latent_grid
        factor = pipe.vae_scale_factor
        latents = type(pipe)._unpack_latents(latents, rows * 2 * factor, columns * 2 * factor, factor)
    config = vae.config
    if config.get("latents_mean") is not None and config.get("latents_std") is not None:
        shape = (1, -1, 1, 1)
        mean = torch.tensor(config.latents_mean, device=latents.device).view(shape)
        std = torch.tensor(config.latents_std, device=latents.device).view(shape)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor + (config.get("shift_factor") or 0.0)
    return vae.decode(latents.to(vae.dtype), return_dict=False)[0]


@dataclass
class GuidedStep:
    """What one guided step used (for checking and logging): the step of the loop run, the scheduler's timestep,
    the noise level x0 was predicted at, and the mean reward of that x0 before the nudge."""

    step: int
    timestep: float
    level: NoiseLevel
    reward: float


class RewardGuidance:
    """Raises the ArtQuant reward of what a pipeline samples, while it samples.

    scale: the step size on x0: x0 moves by `scale * d reward / d x0` at each guided step (reward in the
        `ArtQuantReward`'s normalisation).
    start, stop: the guided steps, counted on the loop the pipeline actually runs (after img2img's strength cut),
        stop exclusive, None = to the end.

    The model output is held fixed (no backward through the UNet or transformer); the VAE decode and the scorer
    are differentiated. `trace` lists the guided steps of the latest pipeline call.
    """

    def __init__(self, reward: ArtQuantReward, scale: float, start: int = 0, stop: int | None = None):
        if start < 0 or (stop is not None and stop < start):
            raise ValueError(f"need 0 <= start <= stop, got start={start}, stop={stop}.")
        self.reward = reward
        self.scale = scale
        self.start = start
        self.stop = stop
        self.trace: list[GuidedStep] = []
        self._loop_step = 0
        self._latent_grid: tuple[int, int] | None = None

    def __call__(self, *args, **kwargs):
        raise TypeError(
            "RewardGuidance is not a step callback any more: run the pipeline inside `with guidance.attached(pipe):`."
        )

    @contextmanager
    def attached(self, pipe) -> Iterator[RewardGuidance]:
        """Guides every call of `pipe` inside the block; the scheduler is restored afterwards."""
        if getattr(pipe, "vae", None) is None:
            raise ValueError(f"reward guidance decodes with the pipeline's VAE; {type(pipe).__name__} has none.")
        kind = schedule_kind(pipe)
        scheduler = pipe.scheduler
        step, set_timesteps = scheduler.step, scheduler.set_timesteps

        @functools.wraps(set_timesteps)  # pipelines inspect its signature (custom sigmas, timesteps)
        def guided_set_timesteps(*args, **kwargs):
            self._loop_step, self.trace = 0, []  # a new pipeline call starts its loop
            return set_timesteps(*args, **kwargs)

        @functools.wraps(step)
        def guided_step(model_output, timestep, sample, *args, **kwargs):
            loop_step, self._loop_step = self._loop_step, self._loop_step + 1
            if self.start <= loop_step < (self.stop if self.stop is not None else math.inf):
                level = noise_level(scheduler, kind, timestep)
                model_output = self._nudged_output(pipe, model_output, sample, level, loop_step, timestep)
            return step(model_output, timestep, sample, *args, **kwargs)

        denoiser = getattr(pipe, "transformer", None)
        # Flux packs latents in 2 x 2 patches; the transformer's image ids hold the grid needed to unpack them.
        hook = (
            denoiser.register_forward_pre_hook(self._record_latent_grid, with_kwargs=True)
            if denoiser is not None and hasattr(type(pipe), "_unpack_latents")
            else None
        )
        scheduler.step, scheduler.set_timesteps = guided_step, guided_set_timesteps
        try:
            yield self
        finally:
            del scheduler.step, scheduler.set_timesteps  # the class's methods show through again
            if hook is not None:
                hook.remove()

    def _record_latent_grid(self, module, args, kwargs) -> None:
        ids = kwargs.get("img_ids")
        if ids is not None:
            ids = ids[0] if ids.ndim == 3 else ids
            generated = ids[ids[:, 0] == 0]  # Kontext appends its reference image's ids with a first coordinate 1
            self._latent_grid = (int(generated[:, 1].max()) + 1, int(generated[:, 2].max()) + 1)

    def _nudged_output(self, pipe, model_output, sample, level: NoiseLevel, loop_step: int, timestep) -> torch.Tensor:
        if sample.ndim not in (3, 4):
            raise ValueError(
                f"reward guidance rates images; {type(pipe).__name__} steps {sample.ndim}-D latents "
                f"{tuple(sample.shape)} (video?), which its decoder does not turn into [B, 3, H, W] images."
            )
        a, b = level.x0_coefficients()
        if b == 0:
            return model_output  # noise-free step: x0 does not depend on the model output
        with torch.enable_grad():
            clean = predict_clean_latents(sample.detach().float(), model_output.detach().float(), level)
            clean.requires_grad_(True)
            images = decode_latents(pipe, clean, self._latent_grid)
            rewards = self.reward.differentiable(images.float().clamp(-1, 1), value_range=(-1, 1))
            (gradient,) = torch.autograd.grad(rewards.sum(), clean)
        self.trace.append(GuidedStep(loop_step, float(timestep), level, float(rewards.detach().mean())))
        # x0 is linear in the output with slope b: this output gives x0 + scale * gradient.
        return (model_output.float() + self.scale * gradient / b).to(model_output.dtype)
