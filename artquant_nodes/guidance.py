"""ArtQuant reward guidance inside a sampler, independent of the model family and the sampler.

At every step a sampler asks the model for its denoised prediction x0 (for epsilon, v and flow-matching models
alike). Inside the chosen window this decodes x0 with the VAE, scores the pictures with ArtQuant and moves x0 up the
score's gradient: x0 + scale * rms(x0) * g / rms(g) per image, g = d score / d x0. The sampler then takes its step
from the improved prediction. The diffusion model is not differentiated (only the VAE decoder and the scorer), so a
guided step costs one decode and one scorer forward+backward on top of the unguided step.

ComfyUI executes nodes under `torch.inference_mode()`, whose tensors (including weights loaded or moved there)
autograd refuses to record. `autograd_usable` lends such weights to autograd as zero-copy aliases for the duration of
the step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch


@contextlib.contextmanager
def autograd_usable(*modules: torch.nn.Module):
    """Within the block, every inference-mode parameter/buffer of `modules` is replaced by a normal tensor aliasing
    the same memory (no copy), so autograd can save it for the backward pass; the originals are put back after."""
    swapped = []
    try:
        for module in modules:
            for owner in module.modules():
                for table in (owner._parameters, owner._buffers):
                    for name, tensor in table.items():
                        if tensor is not None and tensor.is_inference():
                            alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(
                                tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride()
                            )
                            table[name] = torch.nn.Parameter(alias, requires_grad=False) if table is owner._parameters else alias
                            swapped.append((table, name, tensor, table[name]))
        yield
    finally:
        for table, name, tensor, alias in reversed(swapped):
            if table.get(name) is alias:  # a weight moved meanwhile (e.g. by ComfyUI) stays where it was moved
                table[name] = tensor


def per_image_rms(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).pow(2).mean(1).sqrt().view(-1, *([1] * (x.ndim - 1)))


@dataclass
class RewardGuidance:
    """Moves a denoised prediction up the reward: `decode` maps a latent batch to RGB [B, 3, H, W] in [0, 1]
    differentiably, `reward` maps that to one score per image. `scale` is the step length in units of the
    prediction's own RMS; `chunk` bounds how many images are differentiated at once (memory)."""

    decode: Callable[[torch.Tensor], torch.Tensor]
    reward: Callable[[torch.Tensor], torch.Tensor]
    scale: float
    chunk: int = 1
    modules: tuple[torch.nn.Module, ...] = ()

    def gradient(self, denoised: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(d reward / d denoised, reward) for the batch, `chunk` images at a time (each image's reward depends only
        on its own latent, so chunking changes nothing but the memory)."""
        gradients, rewards = [], []
        with torch.inference_mode(False), torch.enable_grad(), autograd_usable(*self.modules):
            for start in range(0, denoised.shape[0], max(1, self.chunk)):
                latent = denoised[start : start + self.chunk].detach().clone().requires_grad_(True)
                reward = self.reward(self.decode(latent))
                (gradient,) = torch.autograd.grad(reward.sum(), latent)
                gradients.append(gradient.detach())
                rewards.append(reward.detach())
        return torch.cat(gradients), torch.cat(rewards)

    def __call__(self, denoised: torch.Tensor) -> torch.Tensor:
        gradient, _ = self.gradient(denoised)
        direction = gradient / per_image_rms(gradient).clamp_min(torch.finfo(gradient.dtype).tiny)
        step = self.scale * per_image_rms(denoised) * direction
        return (denoised.detach().clone() + step.to(denoised.dtype)).to(denoised.device)


def in_window(sigma: float, sigma_start: float, sigma_end: float) -> bool:
    """Whether a step at noise level `sigma` lies between the window's start (higher sigma) and end (lower sigma)."""
    return sigma_end <= sigma <= sigma_start
