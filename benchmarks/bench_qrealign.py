"""Q-ReAlign scorer throughput: images/s batched vs one image at a time, in the same run (the ratio is the figure).

    python benchmarks/bench_qrealign.py                                  # tiny Qwen3.5-VL checkpoint, this CPU
    python benchmarks/bench_qrealign.py --shape 0.8b --device cuda       # Mini-shaped, random weights, bf16
    python benchmarks/bench_qrealign.py --shape 9b --device cuda         # Pro-shaped, random weights, bf16

`tiny` loads tests/data/qrealign_tiny through the real loading path. `0.8b` / `9b` build Qwen3.5-VL with Q-ReAlign
Mini / Pro shapes (text: the Qwen3.5-0.8B / 9B model cards; vision tower: assumed, see SHAPES) and random weights on
the device, with Qwen3.5's image processor settings; nothing is downloaded. Images are decoded uint8 tensors of
mixed sizes (each gets its own token count), so the timing is preprocessing + model, not file decoding.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from artquant import ArtQuantScorer
from artquant.scorer.checkpoint import LoadedCheckpoint
from artquant.scorer.qwen_vl import QwenImageConfig

TINY_DIR = Path(__file__).resolve().parents[1] / "tests" / "data" / "qrealign_tiny"
SHAPES = {
    "0.8b": dict(
        text=dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=16,
                  linear_key_head_dim=128, linear_value_head_dim=128, tie_word_embeddings=True),
        vision=dict(depth=12, hidden_size=768, intermediate_size=3072, num_heads=12, out_hidden_size=1024),
    ),
    "9b": dict(
        text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=32, num_attention_heads=16,
                  num_key_value_heads=4, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
                  linear_key_head_dim=128, linear_value_head_dim=128),
        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096),
    ),
}
# Generated-image sizes (width, height): square, portrait, landscape, small; each a different number of tokens.
SIZES = {"tiny": [(100, 60), (40, 300), (77, 77), (300, 220), (96, 128), (257, 129)],
         "large": [(1024, 1024), (768, 1344), (1344, 768), (512, 512), (896, 1152), (640, 960)]}


def random_scorer(shape: str, device: torch.device, dtype: torch.dtype):
    """A Q-ReAlign scorer on a random Qwen3.5-VL of `shape`, with the tiny checkpoint's tokenizer (its special-token
    ids are written into the config)."""
    from transformers import AutoTokenizer, Qwen3_5Config, Qwen3_5ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(TINY_DIR)
    token = tokenizer.convert_tokens_to_ids
    config = Qwen3_5Config(
        text_config=dict(SHAPES[shape]["text"], vocab_size=248320),
        vision_config=dict(SHAPES[shape]["vision"], patch_size=16, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=token("<|image_pad|>"), video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"), vision_end_token_id=token("<|vision_end|>"),
    )
    with torch.device(device):
        model = Qwen3_5ForConditionalGeneration._from_config(config, dtype=dtype).eval()
    checkpoint = LoadedCheckpoint(model, tokenizer, QwenImageConfig(), f"random {shape}")
    return ArtQuantScorer.from_checkpoint(checkpoint, "qrealign-mini-quality", device, dtype)


def images_per_second(scorer, images: list[torch.Tensor], batch_size: int, repeats: int) -> float:
    scorer.score(images[:batch_size], batch_size=batch_size, workers=1)  # warm-up (allocator, kernels)
    best = 0.0
    for _ in range(repeats):
        if scorer.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        results = scorer.score(images, batch_size=batch_size, workers=1)
        if scorer.device.type == "cuda":
            torch.cuda.synchronize()
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]
        best = max(best, len(images) / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", *SHAPES], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.shape == "tiny":
        scorer = ArtQuantScorer.from_pretrained(TINY_DIR, preset="qrealign-mini-quality", device=device, dtype=dtype)
    else:
        scorer = random_scorer(args.shape, device, dtype)
    generator = torch.Generator().manual_seed(0)
    sizes = SIZES["tiny" if args.shape == "tiny" else "large"]
    images = [torch.randint(0, 256, (3, h, w), generator=generator, dtype=torch.uint8)
              for w, h in (sizes[i % len(sizes)] for i in range(args.images))]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    one = images_per_second(scorer, images, 1, args.repeats)
    batched = images_per_second(scorer, images, args.batch_size, args.repeats)
    report = {
        "shape": args.shape, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype), "threads": torch.get_num_threads(), "images": args.images, "sizes": [f"{w}x{h}" for w, h in sizes],
        "one_at_a_time_images_per_s": round(one, 2), f"batch_{args.batch_size}_images_per_s": round(batched, 2),
        "speedup": round(batched / one, 2),
    }
    if device.type == "cuda":
        report["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
