"""DRaFT-K: fine-tune a LoRA on a diffusers pipeline's denoiser (the UNet of SD 1.x/2.x and SDXL, the transformer
of SD3 and Flux) by backpropagating the ArtQuant reward through the last K denoising steps (Clark et al.,
"Directly Fine-Tuning Diffusion Models on Differentiable Rewards", ICLR 2024).

Samples come from the pipeline's own loop, so every family gets exactly its conditioning (SDXL's added
conditioning, SD3's pooled projections, Flux's packed latents and guidance embedding) and its own scheduler. The
first steps run without gradients; the last K steps, the VAE decode and the frozen scorer are differentiated; only
the LoRA weights train. Run as a script with accelerate:

    accelerate launch -m artquant.reward.finetune --pipeline DIR --prompts prompts.txt --out lora/ --k 1 --steps 500
"""

from __future__ import annotations

import argparse
import inspect
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import LoraConfig
from tqdm.auto import tqdm

from .best_of_n import parse_pipe_args
from .functions import ArtQuantReward

# The attention projections, as diffusers' LoRA training scripts target them in UNets and in SD3/Flux transformers.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DENOISERS = ("unet", "transformer")  # the attribute that holds a pipeline's denoiser, and its LoRA keyword


def denoiser_name(pipe) -> str:
    """"unet" or "transformer": which of a pipeline's modules denoises; raises for other pipelines."""
    for name in DENOISERS:
        if getattr(pipe, name, None) is not None:
            return name
    raise ValueError(f"DRaFT trains a UNet or a transformer; {type(pipe).__name__} has neither.")


def add_lora(denoiser, rank: int = 4, alpha: float | None = None) -> list[torch.nn.Parameter]:
    """Freezes `denoiser`, adds a LoRA adapter (peft) on its attention projections; returns the trainable weights."""
    denoiser.requires_grad_(False)
    denoiser.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS))
    )
    return [p for p in denoiser.parameters() if p.requires_grad]


def sample_with_last_k_gradients(
    pipe, prompts: Sequence[str], generators: Sequence[torch.Generator], num_inference_steps: int, k: int, **call_kwargs
) -> torch.Tensor:
    """Runs the pipeline's own sampling loop; autograd records only the last `k` denoising steps and the decode.
    Returns images [B, 3, H, W] in [0, 1] (the pipeline's "pt" output)."""
    # The loop itself, without the @torch.no_grad() that diffusers wraps around __call__.
    loop = inspect.unwrap(type(pipe).__call__)
    first_with_gradients = num_inference_steps - k

    def switch_gradients_on(pipe_, step_index, timestep, callback_kwargs):
        if step_index + 1 == first_with_gradients:  # the callback runs after its step: turn on for the next one
            torch.set_grad_enabled(True)
        return {}

    previous = torch.is_grad_enabled()
    torch.set_grad_enabled(first_with_gradients == 0)
    try:
        output = loop(
            pipe,
            prompt=list(prompts),
            generator=list(generators),
            num_inference_steps=num_inference_steps,
            output_type="pt",
            callback_on_step_end=switch_gradients_on,
            callback_on_step_end_tensor_inputs=["latents"],
            **call_kwargs,
        )
    finally:
        torch.set_grad_enabled(previous)
    return output.images


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
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    max_grad_norm: float = 1.0,
    gradient_checkpointing: bool = False,
    accelerator: Accelerator | None = None,
    **pipe_kwargs,
) -> list[float]:
    """Trains a LoRA on the pipeline's denoiser in place to raise `reward` on `prompts`; returns the mean reward of
    each step.

    k: the last denoising steps backpropagated through (DRaFT-K; K=1 is DRaFT-1, the cheapest).
    guidance_scale: as the pipeline takes it (classifier-free guidance for SD/SDXL/SD3, the distilled guidance
        embedding for Flux); None keeps the pipeline's default.
    gradient_checkpointing: recompute the denoiser's activations in the backward pass (for large K or images).
    pipe_kwargs: more pipeline arguments (e.g. max_sequence_length, negative_prompt).
    """
    if not 1 <= k <= num_inference_steps:
        raise ValueError(f"k must be between 1 and num_inference_steps={num_inference_steps}, got {k}.")
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings.")
    accelerator = accelerator or Accelerator()
    pipe.to(accelerator.device)
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)  # text encoders and VAE stay frozen
    denoiser = getattr(pipe, denoiser_name(pipe))
    parameters = add_lora(denoiser, lora_rank)
    if gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    # The pipeline calls its own denoiser, so that module is not wrapped; gradients are averaged across processes
    # by hand below instead of by DistributedDataParallel.
    optimizer = accelerator.prepare(torch.optim.AdamW(parameters, lr=learning_rate))
    denoiser.train()
    call_kwargs = dict(pipe_kwargs, height=height, width=width)
    if guidance_scale is not None:
        call_kwargs["guidance_scale"] = guidance_scale
    generator = torch.Generator().manual_seed(seed + accelerator.process_index)  # each process its own samples
    history = []
    for _ in tqdm(range(steps), desc="DRaFT", disable=not accelerator.is_local_main_process):
        batch = [prompts[int(i)] for i in torch.randint(len(prompts), (batch_size,), generator=generator)]
        seeds = torch.randint(2**31 - 1, (batch_size,), generator=generator).tolist()
        noise = [torch.Generator().manual_seed(s) for s in seeds]
        with accelerator.accumulate(denoiser), accelerator.autocast():
            images = sample_with_last_k_gradients(pipe, batch, noise, num_inference_steps, k, **call_kwargs)
            rewards = reward.differentiable(images.float(), value_range=(0, 1), update_stats=True)
            accelerator.backward(-rewards.mean())
            if accelerator.sync_gradients:
                if accelerator.num_processes > 1:
                    for parameter in parameters:
                        if parameter.grad is not None:
                            parameter.grad = accelerator.reduce(parameter.grad, reduction="mean")
                accelerator.clip_grad_norm_(parameters, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        history.append(float(accelerator.gather(rewards.detach()).mean()))
    denoiser.eval()
    return history


def save_lora(pipe, out_dir: str | os.PathLike, accelerator: Accelerator | None = None) -> Path:
    """Writes the denoiser's LoRA to `out_dir`/pytorch_lora_weights.safetensors, which `pipe.load_lora_weights(out_dir)`
    reads (the pipeline class's own `save_lora_weights`, `unet_lora_layers=` or `transformer_lora_layers=`)."""
    from peft.utils import get_peft_model_state_dict

    name = denoiser_name(pipe)
    denoiser = getattr(pipe, name)
    denoiser = accelerator.unwrap_model(denoiser) if accelerator is not None else denoiser
    layers = get_peft_model_state_dict(denoiser)
    type(pipe).save_lora_weights(save_directory=str(out_dir), safe_serialization=True, **{f"{name}_lora_layers": layers})
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
    parser.add_argument("--pipeline", required=True, help="diffusers SD, SDXL, SD3 or Flux pipeline folder or hub id")
    parser.add_argument("--prompts", required=True, help="text file with one prompt a line, or one prompt")
    parser.add_argument("--out", required=True, help="folder for pytorch_lora_weights.safetensors")
    parser.add_argument("--model", default=None, help="scorer checkpoint (default: the preset's)")
    parser.add_argument(
        "--preset",
        default="artquant",
        help="scorer preset: artquant, deqa-score, onealign-*, qrealign-{mini,lite,pro}-{quality,aesthetics}",
    )
    parser.add_argument("--normalize", choices=["raw", "unit", "zscore"], default="unit")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--k", type=int, default=1, help="denoising steps to backpropagate through (DRaFT-K)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--inference-steps", type=int, default=30)
    parser.add_argument(
        "--guidance-scale", type=float, default=None, help="as the pipeline takes it (default: the pipeline's)"
    )
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gradient-accumulation", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="for the UNet or transformer (the scorer always)")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None)
    parser.add_argument(
        "--pipe-arg", action="append", default=[], metavar="KEY=VALUE",
        help="more pipeline arguments, repeatable (e.g. max_sequence_length=256, negative_prompt=blurry)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        pipe_kwargs = parse_pipe_args(args.pipe_arg)
    except ValueError as error:
        parser.error(str(error))

    from diffusers import DiffusionPipeline

    from ..scorer import ArtQuantScorer

    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation
    )
    pipe = DiffusionPipeline.from_pretrained(args.pipeline)
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
        guidance_scale=args.guidance_scale if args.guidance_scale is not None else pipe_kwargs.pop("guidance_scale", None),
        height=args.height,
        width=args.width,
        seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
        accelerator=accelerator,
        **pipe_kwargs,
    )
    if accelerator.is_main_process:
        path = save_lora(pipe, args.out, accelerator)
        accelerator.print(f"mean reward {history[0]:.4f} -> {history[-1]:.4f}; LoRA written to {path}")


if __name__ == "__main__":
    main()
