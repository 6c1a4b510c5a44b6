"""A tiny, randomly initialised Q-ReAlign-shaped checkpoint (Qwen3.5-VL), built from configs in-process.

`python -m tests.qrealign_tiny OUT` writes it; the copy in tests/data/qrealign_tiny is what the golden numbers
(tests/data/qrealign_golden.json, from the authors' inference code) were computed with, so tests load that copy and
never rebuild it. The folder has what a hub release has: config, safetensors weights, tokenizer with its chat
template, and the image processor's `preprocessor_config.json`.
"""

from __future__ import annotations

import sys
from pathlib import Path

TINY_DIR = Path(__file__).parent / "data" / "qrealign_tiny"

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>", "<think>", "</think>",
]

# Qwen3.5's chat template, reduced to what a scorer renders: user turns with images and text, the assistant turn,
# and the generation prompt that opens a thinking block unless `enable_thinking=False`.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}"
    "{%- for item in message.content %}"
    "{%- if item.type == 'image' or 'image' in item %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item.type == 'text' %}{{- item.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{- '<think>\\n' }}{%- endif %}{%- endif %}"
)

CORPUS = [
    "Can you rate the quality of this picture?", "Can you rate the aesthetics of this picture?",
    "How would you rate the quality of this image?", "How would you rate the aesthetics of this image?",
    "The quality of the image is", "The aesthetics of the image is", "The quality of the painting is",
    " excellent good fair poor bad", "excellent good fair poor bad.", "Describe the quality of this image.",
    "Describe the aesthetics of this image.", "user assistant system", "The colours are bright and the "
    "composition is balanced, with a clear subject and soft light.",
]


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen3_5.tokenization_qwen3_5 import Qwen3_5Tokenizer

    # Train byte-level BPE merges on a small corpus (whole words become tokens), then hand vocabulary and merges to
    # Qwen3.5's own tokenizer class, which sets Qwen's pre-tokenizer and decoder.
    trainer_tokenizer = Tokenizer(models.BPE())
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600, show_progress=False, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    trainer_tokenizer.train_from_iterator(CORPUS * 20, trainer)
    state = trainer_tokenizer.model.__getstate__()
    import json

    model = json.loads(state)
    tokenizer = Qwen3_5Tokenizer(vocab=model["vocab"], merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                                                for m in model["merges"]])
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build(out: Path) -> None:
    import torch
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = build_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    config = Qwen3_5Config(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8,
            linear_num_key_heads=2, linear_num_value_heads=4, linear_conv_kernel_dim=4, max_position_embeddings=4096,
            layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                             "mrope_section": [1, 1, 0], "mrope_interleaved": True},
            eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
            temporal_patch_size=2, out_hidden_size=32, num_position_embeddings=64,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    model = Qwen3_5ForConditionalGeneration(config).eval()
    with torch.no_grad():  # random init is tiny (std 0.02): widen it so level probabilities differ between images
        for name, parameter in model.named_parameters():
            if parameter.ndim >= 2 and "embed" not in name:
                parameter.normal_(0, 0.3 / parameter.shape[-1] ** 0.5 * 4)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # Qwen3.5's preprocessing (patch 16, merge 2, mean/std 0.5), with a pixel budget small enough for tests.
    Qwen2VLImageProcessorPil(
        patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": 32 * 32, "longest_edge": 128 * 128},
    ).save_pretrained(out)


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else TINY_DIR)
