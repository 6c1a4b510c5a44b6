"""Reward guidance at real size on a GPU: the cost of a guided step against an unguided one, and peak memory, for
an SDXL-shaped and a Flux-shaped pipeline (random weights, nothing downloaded) guided by a 7B-shaped scorer.

The denoisers and VAEs have their released shapes (SDXL's 2.6 B-parameter UNet and 1024 px VAE; Flux.1's 12 B
transformer and 16-channel VAE), in bf16. The text encoders are one-layer stand-ins with the real output widths
(guidance never runs them per step); the scorer is mPLUG-Owl2 at its 7B shapes.

    python benchmarks/gpu_guidance.py                 # a CUDA GPU with ~60 GB free (Flux + scorer)
    python benchmarks/gpu_guidance.py --family sdxl   # one family
    python benchmarks/gpu_guidance.py --tiny          # the same code on the CPU with tiny models (a smoke test)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny pipelines and tokenizers the tests build offline

from artquant.reward import ArtQuantReward, RewardGuidance  # noqa: E402
from gpu_common import random_model, random_scorer, timed  # noqa: E402
from reward_tiny_pipelines import CALL_OPTIONS, clip_tokenizer, ready, t5_tokenizer, tiny_flux, tiny_sdxl  # noqa: E402


@contextlib.contextmanager
def building(device: torch.device, dtype: torch.dtype):
    """Modules made inside are born on `device` in `dtype`: Flux's 12 B parameters never exist in fp32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def text_encoders(hidden_sizes: dict[str, int]):
    """One-layer CLIP/T5 stand-ins with the given output widths (what the denoisers' projections expect)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def clip(width: int, projection: bool):
        config = CLIPTextConfig(
            vocab_size=len(clip_tokenizer()), hidden_size=width, intermediate_size=width, projection_dim=width,
            num_hidden_layers=1, num_attention_heads=max(1, width // 64), max_position_embeddings=77,
            bos_token_id=0, eos_token_id=1, pad_token_id=2,
        )  # fmt: skip
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)

    encoders = {}
    for name, (kind, width) in hidden_sizes.items():
        if kind == "t5":
            encoders[name] = T5EncoderModel(
                T5Config(vocab_size=len(t5_tokenizer()), d_model=width, d_kv=64, d_ff=1024, num_layers=1, num_heads=width // 64)
            )
        else:
            encoders[name] = clip(width, projection=kind == "clip_projection")
    return encoders


def sdxl_shaped(device: torch.device, dtype: torch.dtype):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    with building(device, dtype):
        return StableDiffusionXLPipeline(
            vae=sdxl_vae(), unet=sdxl_unet(), scheduler=scheduler, tokenizer=clip_tokenizer(max_length=77),
            tokenizer_2=clip_tokenizer(max_length=77), add_watermarker=False,
            **text_encoders({"text_encoder": ("clip", 768), "text_encoder_2": ("clip_projection", 1280)}),
        )  # fmt: skip


def sdxl_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )  # fmt: skip


def sdxl_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=1024,
        scaling_factor=0.13025,
    )  # fmt: skip


def flux_shaped(device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    with building(device, dtype):
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, layers_per_block=2, sample_size=1024,
            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
        )  # fmt: skip
        return FluxPipeline(
            transformer=FluxTransformer2DModel(),  # Flux.1's own defaults: 19 + 38 blocks, 3072 wide, guidance embedding
            vae=vae, scheduler=scheduler, tokenizer=clip_tokenizer(max_length=77), tokenizer_2=t5_tokenizer(),
            **text_encoders({"text_encoder": ("clip", 768), "text_encoder_2": ("t5", 4096)}),
        )  # fmt: skip


FAMILIES = {"sdxl": (sdxl_shaped, tiny_sdxl), "flux": (flux_shaped, tiny_flux)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (proves the script runs)")
    parser.add_argument("--family", choices=[*FAMILIES, "all"], default="all")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    size = 16 if args.tiny else args.size

    scorer = random_scorer(random_model(args.tiny, dtype, device))
    reward = ArtQuantReward(scorer, errors="nan")  # random VAEs may overshoot; the timing is what counts here
    rows = []
    for family in FAMILIES if args.family == "all" else [args.family]:
        real, tiny = FAMILIES[family]
        pipe = tiny() if args.tiny else ready(real(device, dtype))
        options = dict(CALL_OPTIONS[family], height=size, width=size, num_inference_steps=args.steps, output_type="latent")
        generator = torch.Generator().manual_seed(0)

        def sample(pipe=pipe, options=options, generator=generator):
            pipe("a cat", generator=generator, **options)

        guidance = RewardGuidance(reward, scale=1.0)

        def guided(pipe=pipe, sample=sample, guidance=guidance):
            with guidance.attached(pipe):
                sample()

        plain_seconds, plain_memory = timed(sample, device, args.repeats)
        guided_seconds, guided_memory = timed(guided, device, args.repeats)
        rows.append((family, plain_seconds, guided_seconds, plain_memory, guided_memory))
        del pipe, sample, guided
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    where = "CPU, tiny models" if args.tiny else f"{torch.cuda.get_device_name()}, bf16, {size} x {size}"
    scorer_shape = "tiny scorer" if args.tiny else "7B-shaped scorer"
    print(f"{where}; {scorer_shape}; {args.steps} steps, every step guided; mean of {args.repeats} after a warm-up")
    print("| family | ms / step unguided | ms / step guided | extra ms per guided step | guided / unguided | peak GiB unguided | peak GiB guided |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for family, plain, guided_, plain_memory, guided_memory in rows:
        plain_step, guided_step = plain / args.steps * 1000, guided_ / args.steps * 1000
        memory = (f"{plain_memory:.1f} | {guided_memory:.1f}") if plain_memory is not None else "- | -"
        print(f"| {family} | {plain_step:.0f} | {guided_step:.0f} | {guided_step - plain_step:.0f} | {guided_step / plain_step:.2f} | {memory} |")


if __name__ == "__main__":
    main()
