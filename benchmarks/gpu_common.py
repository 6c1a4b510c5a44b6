"""Shared by the GPU benchmarks: 7B-shaped random mPLUG-Owl2 models, their FLOPs, and the card's peak rate."""

from __future__ import annotations

import torch

from artquant.scorer import MPLUGOwl2LlamaForCausalLM, MplugOwl2Config

# LLaMA-2-7B + ViT-L/14 at 448 px + the 6-layer abstractor: MAGAer13/mplug-owl2-llama2-7b's shapes.
SEVEN_B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000)
TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=32000,
    visual_config={
        "visual_model": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56),
        "visual_abstractor": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                  num_learnable_queries=8, encoder_hidden_size=32, grid_size=4),
    },
)
PROMPT_LENGTH = 28  # ArtQuant's scoring prompt: 27 text ids + the image placeholder

# Dense bf16 tensor-core peaks (no sparsity), in FLOP/s.
PEAK_BF16 = {"H100 SXM": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def random_model(tiny: bool, dtype: torch.dtype, device: torch.device) -> MPLUGOwl2LlamaForCausalLM:
    config = MplugOwl2Config(**(TINY if tiny else SEVEN_B))
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = MPLUGOwl2LlamaForCausalLM(config).to(dtype)
    return model.eval()


def prompt_ids(batch: int, device: torch.device) -> torch.Tensor:
    from artquant.scorer import IMAGE_TOKEN_INDEX

    ids = torch.randint(3, 30000, (batch, PROMPT_LENGTH), device=device)
    ids[:, 0] = 1
    ids[:, 15] = IMAGE_TOKEN_INDEX  # where the reference prompt has its image
    return ids


def forward_flops_per_image(config: MplugOwl2Config, text_tokens: int = PROMPT_LENGTH - 1) -> float:
    """Matmul FLOPs (2 x multiply-adds) of one scoring forward pass: ViT, abstractor, LLM, one LM-head row."""
    vision, abstractor = config.vision_config, config.abstractor_config
    d, n = vision.hidden_size, vision.num_positions
    vit = vision.num_hidden_layers * (n * (4 * d * d + 2 * d * vision.intermediate_size) + 2 * n * n * d)
    vit += (n - 1) * 3 * vision.patch_size**2 * d
    a, q = abstractor.hidden_size, abstractor.num_learnable_queries
    keys = q + n
    abstract = abstractor.num_hidden_layers * (
        2 * q * a * a + 2 * keys * abstractor.encoder_hidden_size * a + 2 * q * keys * a + 3 * q * a * abstractor.intermediate_size
    ) + q * a * config.hidden_size
    h, t = config.hidden_size, text_tokens + config.num_visual_tokens
    kv = config.num_key_value_heads * config.head_dim
    llm = config.num_hidden_layers * (t * (2 * h * h + 2 * h * kv + 3 * h * config.intermediate_size) + 2 * t * t * h)
    return 2.0 * (vit + abstract + llm + h * config.vocab_size)


def peak_flops(override_tflops: float | None) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, f"given {override_tflops} TFLOP/s"
    if not torch.cuda.is_available():
        return None, "no GPU"
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16.items():
        if all(part in name for part in key.split()):
            return value, f"{name}: {value / 1e12:.0f} TFLOP/s dense bf16"
    return None, f"{name}: unknown peak (pass --peak-tflops)"
