"""Reward guidance: nudge a diffusers pipeline's latents up the ArtQuant gradient while it samples.

At each chosen step the callback predicts the clean latent x0 from the current latents (one extra UNet call, held
fixed), decodes it with the pipeline's VAE, and adds `scale * d reward / d latents` to the latents.

Supported: UNet pipelines conditioned by `encoder_hidden_states` (Stable Diffusion 1.x / 2.x and their
img2img/inpaint variants) with a variance-preserving scheduler, x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, read from
`scheduler.alphas_cumprod` (DDIM, DDPM, PNDM, DPM-Solver(++), UniPC, DEIS), epsilon or v prediction.
Sigma-parameterised schedulers (Euler, Heun, LMS, KDPM2) are refused.
"""

from __future__ import annotations

import torch

from .functions import ArtQuantReward

PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_scheduler(scheduler) -> None:
    """Raises unless `scheduler` is a variance-preserving scheduler with epsilon or v prediction."""
    name = type(scheduler).__name__
    if getattr(scheduler, "alphas_cumprod", None) is None or float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
        raise ValueError(
            f"reward guidance needs a variance-preserving scheduler (DDIM, DDPM, PNDM, DPM-Solver, UniPC, "
            f"DEIS); {name} is sigma-parameterised. Swap it: pipe.scheduler = DDIMScheduler.from_config("
            "pipe.scheduler.config)."
        )
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"reward guidance supports prediction_type {PREDICTION_TYPES}, not {prediction_type!r}.")


def noise_prediction(
    unet, scheduler, latents: torch.Tensor, timestep, prompt_embeds: torch.Tensor, guidance_scale: float | None
) -> torch.Tensor:
    """The UNet's output at `latents` [B, C, h, w] and `timestep`, classifier-free guided unless `guidance_scale` is
    None; then `prompt_embeds` is [2B, L, D], negative first, as diffusers pipelines hold it in their loop."""
    model_input = latents if guidance_scale is None else torch.cat([latents] * 2)
    model_input = scheduler.scale_model_input(model_input, timestep)
    prediction = unet(model_input, timestep, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
    if guidance_scale is None:
        return prediction
    unconditional, conditional = prediction.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def predict_clean_latents(scheduler, latents: torch.Tensor, timestep, model_output: torch.Tensor) -> torch.Tensor:
    """x0 from x_t = `latents` and the model's epsilon or v prediction: differentiable in `latents`."""
    alpha_bar = scheduler.alphas_cumprod[int(timestep)].to(latents.device, torch.float32)
    signal, noise = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if scheduler.config.get("prediction_type", "epsilon") == "v_prediction":
        return signal * latents - noise * model_output
    return (latents - noise * model_output) / signal


class RewardGuidance:
    """A `callback_on_step_end` that raises the ArtQuant reward of what a pipeline is sampling.

    >>> guidance = RewardGuidance(ArtQuantReward(scorer), scale=0.5, start=10, stop=25)
    >>> pipe(prompt, callback_on_step_end=guidance, callback_on_step_end_tensor_inputs=guidance.tensor_inputs)

    start, stop: the denoising steps (indices into the loop, stop exclusive, None = the end) after which to guide.
    scale: the step size on `d reward / d latents` (reward in the `ArtQuantReward`'s normalisation).
    The UNet's output is held fixed (no backward through the UNet); the VAE decode and the scorer are
    differentiated. After the last step the latents are the clean latent itself.
    """

    tensor_inputs = ["latents", "prompt_embeds"]

    def __init__(self, reward: ArtQuantReward, scale: float, start: int = 0, stop: int | None = None):
        self.reward = reward
        self.scale = scale
        self.start = start
        self.stop = stop

    def __call__(self, pipe, step_index: int, timestep, callback_kwargs: dict) -> dict:
        stop = self.stop if self.stop is not None else len(pipe.scheduler.timesteps)
        if not self.start <= step_index < stop:
            return callback_kwargs
        missing = [name for name in self.tensor_inputs if name not in callback_kwargs]
        if missing:
            raise ValueError(
                f"reward guidance needs {missing} from the pipeline: pass "
                "callback_on_step_end_tensor_inputs=guidance.tensor_inputs."
            )
        check_scheduler(pipe.scheduler)
        latents = callback_kwargs["latents"]
        callback_kwargs["latents"] = latents + self.scale * self.reward_gradient(
            pipe, latents, step_index, callback_kwargs["prompt_embeds"]
        ).to(latents.dtype)
        return callback_kwargs

    def reward_gradient(
        self, pipe, latents: torch.Tensor, step_index: int, prompt_embeds: torch.Tensor
    ) -> torch.Tensor:
        """d reward(decode(x0(latents))) / d latents, the latents being those after denoising step `step_index`."""
        timesteps = pipe.scheduler.timesteps
        # The latents now belong to the next timestep; after the last step they are the clean latent.
        next_timestep = timesteps[step_index + 1] if step_index + 1 < len(timesteps) else None
        with torch.no_grad():
            guidance_scale = pipe.guidance_scale if getattr(pipe, "do_classifier_free_guidance", False) else None
            model_output = (
                None
                if next_timestep is None
                else noise_prediction(pipe.unet, pipe.scheduler, latents, next_timestep, prompt_embeds, guidance_scale)
            )
        with torch.enable_grad():
            noisy = latents.detach().float().requires_grad_(True)
            clean = (
                noisy
                if next_timestep is None
                else predict_clean_latents(pipe.scheduler, noisy, next_timestep, model_output.float())
            )
            vae = pipe.vae
            image = vae.decode((clean / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0]
            rewards = self.reward.differentiable(image.float().clamp(-1, 1), value_range=(-1, 1))
            (gradient,) = torch.autograd.grad(rewards.sum(), noisy)
        return gradient
