"""DRaFT-K: fine-tune a LoRA on a diffusers UNet by backpropagating the ArtQuant reward through the last K
denoising steps (Clark et al., "Directly Fine-Tuning Diffusion Models on Differentiable Rewards", ICLR 2024).

The first steps of each sample run without gradients; the last K steps, the VAE decode and the frozen scorer are
differentiated; only the LoRA weights train. Run as a script with accelerate:

    accelerate launch -m artquant.reward.finetune --pipeline DIR --prompts prompts.txt --out lora/ --k 1 --steps 500
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import LoraConfig
from tqdm.auto import tqdm

from .functions import ArtQuantReward
from .guidance import noise_prediction

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the UNet's attention projections, as diffusers' LoRA scripts


def add_lora(unet, rank: int = 4, alpha: float | None = None) -> list[torch.nn.Parameter]:
    """Freezes `unet`, adds a LoRA adapter (peft) on its attention projections and returns the trainable weights."""
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS))
    )
    return [p for p in unet.parameters() if p.requires_grad]


def encode_prompts(pipe, prompts: Sequence[str], guidance_scale: float | None, device) -> torch.Tensor:
    """Prompt embeddings [B, L, D], or [2B, L, D] (empty negative prompt first) with classifier-free guidance."""
    with torch.no_grad():
        positive, negative = pipe.encode_prompt(list(prompts), device, 1, guidance_scale is not None)
    return positive if guidance_scale is None else torch.cat([negative, positive])


def sample_with_last_k_gradients(
    pipe,
    unet,
    prompt_embeds: torch.Tensor,
    latents: torch.Tensor,
    num_inference_steps: int,
    k: int,
    guidance_scale: float | None,
) -> torch.Tensor:
    """Samples from `latents` and decodes; autograd records only the last `k` denoising steps and the decode.
    Returns images [B, 3, H, W] in [-1, 1] (clamped as diffusers' postprocessing does)."""
    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_inference_steps, device=latents.device)  # also resets multistep schedulers' history
    for index, timestep in enumerate(scheduler.timesteps):
        with torch.set_grad_enabled(index >= len(scheduler.timesteps) - k):
            model_output = noise_prediction(unet, scheduler, latents, timestep, prompt_embeds, guidance_scale)
            latents = scheduler.step(model_output, timestep, latents, return_dict=False)[0]
    vae = pipe.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return images.float().clamp(-1, 1)


def draft_finetune(
    pipe,
    reward: ArtQuantReward,
    prompts: Sequence[str],
    steps: int = 100,
    k: int = 1,
    batch_size: int = 2,
    learning_rate: float = 1e-4,
    lora_rank: int = 4,
    num_inference_steps: int = 20,
    guidance_scale: float = 1.0,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    max_grad_norm: float = 1.0,
    gradient_checkpointing: bool = False,
    accelerator: Accelerator | None = None,
) -> list[float]:
    """Trains a LoRA on `pipe.unet` in place to raise `reward` on `prompts`; returns the mean reward of each step.

    k: the last denoising steps backpropagated through (DRaFT-K; K=1 is DRaFT-1, the cheapest).
    guidance_scale: classifier-free guidance while sampling (<= 1 turns it off).
    gradient_checkpointing: recompute the UNet's activations in the backward pass (for large K or images).
    """
    if not 1 <= k <= num_inference_steps:
        raise ValueError(f"k must be between 1 and num_inference_steps={num_inference_steps}, got {k}.")
    accelerator = accelerator or Accelerator()
    device = accelerator.device
    pipe.to(device)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    parameters = add_lora(pipe.unet, lora_rank)
    if gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate)
    unet, optimizer = accelerator.prepare(pipe.unet, optimizer)
    unet.train()
    cfg_scale = guidance_scale if guidance_scale > 1 else None
    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    latent_shape = (
        batch_size,
        pipe.unet.config.in_channels,
        height // pipe.vae_scale_factor,
        width // pipe.vae_scale_factor,
    )
    generator = torch.Generator().manual_seed(seed + accelerator.process_index)  # each process its own samples
    history = []
    for _ in tqdm(range(steps), desc="DRaFT", disable=not accelerator.is_local_main_process):
        batch = [prompts[int(i)] for i in torch.randint(len(prompts), (batch_size,), generator=generator)]
        latents = torch.randn(latent_shape, generator=generator).to(device) * pipe.scheduler.init_noise_sigma
        with accelerator.accumulate(unet):
            embeds = encode_prompts(pipe, batch, cfg_scale, device)
            images = sample_with_last_k_gradients(pipe, unet, embeds, latents, num_inference_steps, k, cfg_scale)
            rewards = reward.differentiable(images, value_range=(-1, 1))
            accelerator.backward(-rewards.mean())
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(parameters, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        history.append(float(accelerator.gather(rewards.detach()).mean()))
    unet.eval()
    return history


def save_lora(pipe, unet, out_dir: str | os.PathLike, accelerator: Accelerator | None = None) -> Path:
    """Writes the LoRA to `out_dir`/pytorch_lora_weights.safetensors, which `pipe.load_lora_weights(out_dir)` reads."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet = accelerator.unwrap_model(unet) if accelerator is not None else unet
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    type(pipe).save_lora_weights(save_directory=str(out_dir), unet_lora_layers=layers, safe_serialization=True)
    return Path(out_dir) / "pytorch_lora_weights.safetensors"


def _read_prompts(value: str) -> list[str]:
    path = Path(value)
    prompts = [line.strip() for line in path.read_text().splitlines()] if path.is_file() else [value]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise SystemExit(f"no prompts in {value}: give a text file with one prompt a line, or a prompt.")
    return prompts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="diffusers Stable Diffusion pipeline folder or hub id")
    parser.add_argument("--prompts", required=True, help="text file with one prompt a line, or one prompt")
    parser.add_argument("--out", required=True, help="folder for pytorch_lora_weights.safetensors")
    parser.add_argument("--model", default=None, help="scorer checkpoint (default: the preset's)")
    parser.add_argument("--preset", default="artquant")
    parser.add_argument("--normalize", choices=["raw", "unit", "zscore"], default="unit")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--k", type=int, default=1, help="denoising steps to backpropagate through (DRaFT-K)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--inference-steps", type=int, default=30)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gradient-accumulation", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="for the UNet (the scorer always)")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None)
    args = parser.parse_args(argv)

    from diffusers import DDIMScheduler, DiffusionPipeline

    from ..scorer import ArtQuantScorer

    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation
    )
    pipe = DiffusionPipeline.from_pretrained(args.pipeline)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # deterministic, differentiable steps
    pipe.set_progress_bar_config(disable=True)
    scorer = ArtQuantScorer.from_pretrained(args.model, preset=args.preset, device=accelerator.device)
    reward = ArtQuantReward(scorer, normalize=args.normalize)
    history = draft_finetune(
        pipe,
        reward,
        _read_prompts(args.prompts),
        steps=args.steps,
        k=args.k,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        lora_rank=args.rank,
        num_inference_steps=args.inference_steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
        accelerator=accelerator,
    )
    if accelerator.is_main_process:
        path = save_lora(pipe, pipe.unet, args.out, accelerator)
        accelerator.print(f"mean reward {history[0]:.4f} -> {history[-1]:.4f}; LoRA written to {path}")


if __name__ == "__main__":
    main()
