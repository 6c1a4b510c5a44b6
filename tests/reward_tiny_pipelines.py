"""Tiny, randomly initialised diffusers pipelines built offline (tokenizers made in-process): SD 1.x (with its
img2img and 4-/9-channel inpaint variants), SDXL, SD3 and Flux. Sizes follow diffusers' own pipeline tests, smaller.
Also the tiny Q-ReAlign scorer the reward suites run beside the ArtQuant fixture.

Each builder is deterministic in its `seed`; images are SIZE x SIZE pixels.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

SIZE = 16  # pixels; every VAE here halves it once
FAMILIES = ("sd", "sdxl", "sd3", "flux")


def clip_tokenizer(max_length: int = 16) -> CLIPTokenizer:
    """A character-level CLIP tokenizer (no merges)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for letter in string.ascii_lowercase:
        vocab[letter], vocab[letter + "</w>"] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length, pad_token="!")


def t5_tokenizer() -> T5TokenizerFast:
    """A character-level SentencePiece-style (Unigram) tokenizer with T5's special tokens."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(letter, -1.0) for letter in string.ascii_lowercase]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    return T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)


def clip_text_config(hidden_size: int = 16, projection_dim: int = 16) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(clip_tokenizer()),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=projection_dim,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )


def vae(latent_channels: int = 4, **config) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=SIZE,
        **config,
    )


def sd_unet(in_channels: int = 4, **config) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=SIZE // 2,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4,
        norm_num_groups=8,
        **config,
    )


def sd_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def ready(pipe):
    """Evaluation mode as `from_pretrained` leaves it (T5's dropout would otherwise make every call random)."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd(seed: int = 0, kind: type = StableDiffusionPipeline, in_channels: int = 4):
    """Stable Diffusion 1.x (or its img2img/inpaint class; `in_channels=9` for an inpainting UNet), DDIM."""
    torch.manual_seed(seed)
    pipe = kind(
        vae=vae(),
        text_encoder=CLIPTextModel(clip_text_config()),
        tokenizer=clip_tokenizer(),
        unet=sd_unet(in_channels, cross_attention_dim=16),
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return ready(pipe)


def tiny_sd_img2img(seed: int = 0) -> StableDiffusionImg2ImgPipeline:
    return tiny_sd(seed, StableDiffusionImg2ImgPipeline)


def tiny_sd_inpaint(seed: int = 0, in_channels: int = 4) -> StableDiffusionInpaintPipeline:
    return tiny_sd(seed, StableDiffusionInpaintPipeline, in_channels)


def tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL: two CLIP encoders (the second with a projection), text-time added conditioning, Euler as SDXL ships."""
    torch.manual_seed(seed)
    addition_time_embed_dim = 4
    pipe = StableDiffusionXLPipeline(
        vae=vae(),
        text_encoder=CLIPTextModel(clip_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config()),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=sd_unet(
            cross_attention_dim=32,  # both encoders' hidden states side by side
            addition_embed_type="text_time",
            addition_time_embed_dim=addition_time_embed_dim,
            projection_class_embeddings_input_dim=16 + 6 * addition_time_embed_dim,  # pooled text + 6 size ids
            use_linear_projection=True,
        ),
        scheduler=EulerDiscreteScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            steps_offset=1,
            timestep_spacing="leading",
        ),
        add_watermarker=False,
    )
    return ready(pipe)


def tiny_sd3(seed: int = 0) -> StableDiffusion3Pipeline:
    """SD3: an MMDiT on flow matching, two CLIP encoders and a T5 encoder."""
    torch.manual_seed(seed)
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=SIZE // 2,
            patch_size=1,
            in_channels=4,
            out_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,  # the T5 width; the two CLIP widths (16 + 16) are padded to it
            caption_projection_dim=16,
            pooled_projection_dim=32,
            pos_embed_max_size=32,  # up to 256 px
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=CLIPTextModelWithProjection(clip_text_config()),
        tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config()),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=T5EncoderModel(t5_config(32)),
        tokenizer_3=t5_tokenizer(),
    )
    return ready(pipe)


def t5_config(d_model: int) -> T5Config:
    return T5Config(
        vocab_size=len(t5_tokenizer()),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
    )


def tiny_flux(seed: int = 0) -> FluxPipeline:
    """Flux: a packed-latent (2 x 2 patches) transformer with guidance embedding, CLIP pooled + T5 text."""
    torch.manual_seed(seed)
    pipe = FluxPipeline(
        transformer=FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels x a 2 x 2 patch
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=16,
            guidance_embeds=True,
            axes_dims_rope=[2, 2, 4],
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=CLIPTextModel(clip_text_config()),
        tokenizer=clip_tokenizer(),
        text_encoder_2=T5EncoderModel(t5_config(32)),
        tokenizer_2=t5_tokenizer(),
    )
    return ready(pipe)


BUILDERS = {"sd": tiny_sd, "sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux}
# What each family needs per call beyond the prompt: Flux's T5 length must fit the tiny tokenizer's test prompts.
CALL_OPTIONS = {
    "sd": {},
    "sdxl": {},
    "sd3": {"max_sequence_length": 16},
    "flux": {"max_sequence_length": 16, "guidance_scale": 3.5},
}


QREALIGN_TINY = Path(__file__).parent / "data" / "qrealign_tiny"  # tests/qrealign_tiny.py: a tiny random Qwen3.5-VL
QREALIGN_PRESET = "qrealign-mini-quality"
# Each scorer family's score range as its authors define it: ArtQuant's level weights run 1..10, Q-ReAlign's 1, 0.75,
# 0.5, 0.25, 0 (pyiqa's qrealign_arch.py). Unit rewards and the default fallback (the lowest score) follow from these.
SCORE_RANGES = {"artquant": (1.0, 10.0), "qrealign": (0.0, 1.0)}


def score_range(scorer) -> tuple[float, float]:
    return SCORE_RANGES["qrealign" if scorer.preset.family == "qwen_vl" else "artquant"]


def tiny_qrealign_scorer(dtype: str = "fp32"):
    """A Q-ReAlign scorer on the tiny checkpoint, CPU: a fresh copy per call, since rewards freeze the model and
    switch on its activation checkpointing in place."""
    from artquant import ArtQuantScorer

    return ArtQuantScorer.from_pretrained(QREALIGN_TINY, preset=QREALIGN_PRESET, device="cpu", dtype=dtype)


def fresh_scorer(family: str, request):
    """A fresh fp32 CPU scorer of `family` (a key of SCORE_RANGES): the tiny Q-ReAlign, or the reference fixture's
    ArtQuant LoRA release (found through pytest's `reference_dir` fixture, which skips or fails without it)."""
    if family == "qrealign":
        return tiny_qrealign_scorer()
    from artquant import ArtQuantScorer

    reference_dir = request.getfixturevalue("reference_dir")
    return ArtQuantScorer.from_pretrained(reference_dir / "artquant_lora", device="cpu", dtype="fp32")
