"""Prefix caching: scoring with the prompt's text before the image computed once vs. in every batch, same run.

A quarter-width random mPLUG-Owl2 (LLaMA 1024 wide x 32 layers, ViT 256 wide x 24 layers at 448 px, 65 visual
tokens; the real ArtQuant prompt ids, 15 of whose 93 LLM positions come before the image). Two timings, each as
back-to-back pairs (cache on, cache off) so both see the same machine load:

- `level_logits`: the whole scoring forward pass (ViT, abstractor, LLM, LM head at the answer position);
- LLM only: the decoder on precomputed visual tokens, which is what the cache shortens.

On the CPU the clock is this process's CPU time (`time.process_time`, one torch thread by default): on a shared
machine wall time measures the neighbours' load more than the code. On a GPU, wall time after synchronising.

    python benchmarks/bench_prefix_cache.py              # quarter-width model, fp32, this CPU
    python benchmarks/bench_prefix_cache.py --tiny       # seconds: proves the script runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from gpu_common import random_model, random_scorer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paired(run, repeats: int, device: torch.device) -> list[tuple[float, float]]:
    """(seconds with the cache, seconds without) per repeat, after one untimed warm-up of each."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    run(True), run(False)
    pairs = []
    for _ in range(repeats):
        times = []
        for cached in (True, False):
            synchronize(device)
            start = clock()
            run(cached)
            synchronize(device)
            times.append(clock() - start)
        pairs.append(tuple(times))
    return pairs


def summary(pairs: list[tuple[float, float]], batch: int) -> dict:
    return {
        "cached_images_per_s": batch / statistics.median(c for c, _ in pairs),
        "uncached_images_per_s": batch / statistics.median(u for _, u in pairs),
        "speedup_median_of_pairs": statistics.median(u / c for c, u in pairs),
        "speedup_range": [min(u / c for c, u in pairs), max(u / c for c, u in pairs)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = random_model(args.tiny, dtype, device, shape="tiny" if args.tiny else "quarter")
    scorer = random_scorer(model)
    size = model.config.vision_config.image_size
    pixel_values = torch.randn(args.batch_size, 3, size, size, device=device, dtype=dtype)

    def score(cached: bool) -> torch.Tensor:
        scorer.prefix_caching = cached
        with torch.inference_mode():
            return scorer.level_logits(pixel_values)

    max_difference = float((score(True) - score(False)).abs().max())
    whole = paired(score, args.repeats, device)

    # LLM only: the same decoder call `level_logits` makes, on visual tokens computed once here.
    ids = scorer.prompt_ids
    with torch.inference_mode():
        features = model.model.encode_images(pixel_values)
        prefix = model.encode_prompt_prefix(ids[: ids.tolist().index(-200)])

    def decoder(cached: bool) -> None:
        start = prefix.length if cached else 0
        with torch.inference_mode():
            spliced = model.embed_multimodal(ids[start:].expand(args.batch_size, -1), image_features=features)
            model(
                inputs_embeds=spliced["inputs_embeds"],
                modality_indicators=spliced["modality_indicators"],
                cache=prefix.for_batch(args.batch_size) if cached else None,
                logits_to_keep=1,
                use_cache=False,
            )

    llm_only = paired(decoder, args.repeats, device)
    report = {
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} torch thread(s), CPU time",
        "model": "tiny" if args.tiny else "quarter-width mPLUG-Owl2 (random), 448 px",
        "dtype": str(dtype),
        "batch_size": args.batch_size,
        "llm_positions": len(ids) - 1 + model.config.num_visual_tokens,
        "cached_prefix_positions": prefix.length,
        "level_logits": summary(whole, args.batch_size),
        "llm_only": summary(llm_only, args.batch_size),
        "max_logit_difference": max_difference,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
