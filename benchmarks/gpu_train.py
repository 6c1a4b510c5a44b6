"""Training throughput of the reference recipe on a 7B-shaped mPLUG-Owl2 with random weights.

LoRA r 128 on q_proj / v_proj.multiway.1, visual abstractor and vision model trained, bf16 autocast with fp32
trainable weights, 448 px, batch 4 per device (2 score + 2 description samples, as RAD training mixes them),
AdamW. Reports samples/s and peak memory with gradient checkpointing on and off, and the forward+backward matmul
FLOPs (counted by torch's FlopCounterMode, without checkpointing's recomputation) as a fraction of the card's
dense bf16 peak.

    python benchmarks/gpu_train.py                 # on a GPU
    python benchmarks/gpu_train.py --tiny          # the fixture-sized model on the CPU, to check the script
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from artquant.scorer import IMAGE_TOKEN_INDEX
from artquant.scorer.modeling_mplug_owl2 import IGNORE_INDEX
from artquant.training.config import TrainingConfig
from artquant.training.loss import ArtQuantLoss
from artquant.training.trainer import prepare_for_training
from gpu_common import peak_flops, random_model

ANSWER_PREFIX_IDS = [450, 11029, 310, 278, 20413, 338]  # "The quality of the painting is" in LLaMA-2's vocabulary
LEVEL_IDS = [15129, 1781, 6534, 6460, 4319]
PROMPT_TOKENS = 52  # v1 system prompt + question up to "ASSISTANT:" (image placeholder included)


def sample_batch(count: int, answer_tokens: int, image_size: int, score: bool, device) -> dict[str, torch.Tensor]:
    """Random ids shaped like the training conversations: prompt, image placeholder, labelled answer."""
    length = PROMPT_TOKENS + answer_tokens
    input_ids = torch.randint(3, 30000, (count, length), device=device)
    input_ids[:, 0] = 1
    input_ids[:, 35] = IMAGE_TOKEN_INDEX
    if score:
        answer = torch.tensor(ANSWER_PREFIX_IDS + [LEVEL_IDS[1], 29889, 2], device=device)
        input_ids[:, PROMPT_TOKENS : PROMPT_TOKENS + len(answer)] = answer
    labels = input_ids.clone()
    labels[:, :PROMPT_TOKENS] = IGNORE_INDEX
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": torch.ones_like(input_ids, dtype=torch.bool),
        "pixel_values": torch.randn(count, 3, image_size, image_size, device=device),
    }
    if score:
        batch["level_probs"] = torch.softmax(torch.randn(count, 5, device=device), -1)
    return batch


def measure(args, checkpointing: bool, device, autocast_dtype) -> dict:
    torch.manual_seed(0)
    network = random_model(args.tiny, autocast_dtype if device.type == "cuda" else torch.float32, device)
    recipe = TrainingConfig(gradient_checkpointing=checkpointing, lora_r=args.lora_r, lora_alpha=2 * args.lora_r)
    network = prepare_for_training(network, recipe)
    model = ArtQuantLoss(network, LEVEL_IDS, ANSWER_PREFIX_IDS).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5, weight_decay=0)
    image_size = network.get_base_model().config.vision_config.image_size
    half = args.batch_size // 2
    batch = {"score": sample_batch(half, 9, image_size, True, device),
             "description": sample_batch(args.batch_size - half, args.description_tokens, image_size, False, device)}

    def step():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=device.type == "cuda"):
            loss = model(**batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    try:
        for _ in range(args.warmup):
            step()
        synchronize()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        synchronize()
        seconds = (time.perf_counter() - start) / args.steps
    except torch.OutOfMemoryError:
        return {"gradient_checkpointing": checkpointing, "error": "out of memory"}
    result = {
        "gradient_checkpointing": checkpointing,
        "samples_per_second": round(args.batch_size / seconds, 3),
        "seconds_per_step": round(seconds, 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if not checkpointing:  # count once, without recomputation: the useful work of a step
        counter = FlopCounterMode(display=False)
        with counter, torch.autocast(device.type, dtype=autocast_dtype, enabled=device.type == "cuda"):
            model(**batch)["loss"].backward()
        optimizer.zero_grad(set_to_none=True)
        result["flops_per_step"] = counter.get_total_flops()
    del model, network, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="fixture-sized model on the CPU (checks the script)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--description-tokens", type=int, default=256, help="answer length of a RAD description")
    parser.add_argument("--lora-r", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, if not known")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    results = [measure(args, False, device, torch.bfloat16), measure(args, True, device, torch.bfloat16)]
    flops = results[0].get("flops_per_step")
    peak, peak_note = peak_flops(args.peak_tflops)
    for result in results:
        if flops and "seconds_per_step" in result and peak:
            result["fraction_of_bf16_peak"] = round(flops / result["seconds_per_step"] / peak, 3)
    print(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "peak": peak_note,
                      "batch_size": args.batch_size, "results": results}, indent=2))


if __name__ == "__main__":
    main()
