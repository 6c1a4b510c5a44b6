"""Shared by the benchmarks: random mPLUG-Owl2 models (7B-shaped, quarter-width, tiny), a scorer around them, their
FLOPs, and the card's peak rate."""

from __future__ import annotations

import time

import torch

from artquant.scorer import ArtQuantScorer, ImageProcessingConfig, MPLUGOwl2LlamaForCausalLM, MplugOwl2Config, get_preset
from artquant.scorer.checkpoint import LoadedCheckpoint

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
# A quarter of the width everywhere (LLM, ViT, abstractor) at the full depth, image size and token counts: ~0.5 B
# parameters, so the LLM's share of the work and the prompt's share of the LLM's tokens stay as in the 7B model.
QUARTER = dict(
    hidden_size=1024, intermediate_size=2752, num_hidden_layers=32, num_attention_heads=8, vocab_size=32000,
    visual_config={
        "visual_model": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=24, num_attention_heads=4, image_size=448),
        "visual_abstractor": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=4,
                                  num_learnable_queries=64, encoder_hidden_size=256, grid_size=32),
    },
)
SHAPES = {"7b": SEVEN_B, "quarter": QUARTER, "tiny": TINY}
# ArtQuant's scoring prompt as the LLaMA-2 tokenizer encodes it (the fixture's golden ids), and its level words' ids:
# the benchmarks run the scorer's own path without shipping the tokenizer.
ARTQUANT_PROMPT_IDS = [1, 3148, 1001, 29901, 1128, 723, 366, 6554, 278, 11029, 310, 445, 20413, 29973, 13, -200, 29871,
                       319, 1799, 9047, 13566, 29901, 450, 11029, 310, 278, 20413, 338]
LEVEL_IDS = {"excellent": 15129, "good": 1781, "fair": 6534, "poor": 6460, "bad": 4319}
PROMPT_LENGTH = len(ARTQUANT_PROMPT_IDS)  # 27 text ids + the image placeholder

# Dense bf16 tensor-core peaks (no sparsity), in FLOP/s.
PEAK_BF16 = {"H100 SXM": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def random_model(tiny: bool, dtype: torch.dtype, device: torch.device, shape: str | None = None) -> MPLUGOwl2LlamaForCausalLM:
    """`shape`: a key of SHAPES (default: "tiny" if `tiny` else "7b")."""
    config = MplugOwl2Config(**SHAPES[shape or ("tiny" if tiny else "7b")])
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = MPLUGOwl2LlamaForCausalLM(config).to(dtype)
    return model.eval()


class FixedPromptTokenizer:
    """Stands in for the LLaMA tokenizer: ArtQuant's scoring prompt and level words as fixed ids."""

    eos_token_id = 2

    def encode_with_images(self, prompt: str) -> list[int]:
        return ARTQUANT_PROMPT_IDS

    def word_token_id(self, word: str) -> int:
        return LEVEL_IDS[word]


def random_scorer(model: MPLUGOwl2LlamaForCausalLM) -> ArtQuantScorer:
    """An `ArtQuantScorer` (the real scoring path, prefix cache included) around a random model."""
    size = model.config.vision_config.image_size
    checkpoint = LoadedCheckpoint(model, FixedPromptTokenizer(), ImageProcessingConfig(resize_to=size, crop_size=size), "random")
    return ArtQuantScorer(checkpoint, get_preset("artquant"), model.device, model.dtype)


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


def timed(run, device: torch.device, repeats: int) -> tuple[float, float | None]:
    """(seconds per call, peak memory in GiB or None on the CPU), after one warm-up call."""
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    return seconds, (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)
