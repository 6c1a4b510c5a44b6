"""The exact-PIL resize on the CPU: banded products (each block of outputs times the inputs its taps reach) vs one
dense product per pass (the previous implementation), and PIL's own padding and resize (which the CPU path runs where
it is faster: `_pil_is_faster`), same run, same images (channels-last, as decoded), outputs compared for equality.

    python benchmarks/bench_resize.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from unittest import mock

import torch

from artquant.scorer import preprocessing

FILL = torch.tensor((122.0, 116.0, 104.0), dtype=torch.float64)  # CLIP's pad colour


def best_time(resize, repeats: int) -> tuple[float, torch.Tensor]:
    preprocessing._resize_plan.cache_clear()
    result = resize()  # warm-up, and the plan for this geometry
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        resize()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    report = {"machine": f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}", "sizes": {}}
    for width, height, out in [(1024, 1024, 448), (1344, 768, 448), (2048, 1536, 448), (2048, 2048, 448), (512, 512, 448),
                                (768, 512, 448), (160, 107, 56)]:
        image = torch.randint(0, 256, (1, height, width, 3), dtype=torch.uint8, generator=generator).permute(0, 3, 1, 2)
        torch_resize = lambda: preprocessing.pad_and_resize(image, out, FILL)  # noqa: E731
        banded, banded_result = best_time(torch_resize, args.repeats)
        with mock.patch.object(preprocessing, "_blocks", lambda m: ((0, m.shape[0], 0, m.shape[1]),)):
            dense, dense_result = best_time(torch_resize, args.repeats)
        fill = tuple(int(v) for v in FILL)
        pil, pil_result = best_time(lambda: preprocessing._pil_pad_and_resize(image[0], out, fill), args.repeats)
        assert torch.equal(banded_result, dense_result), "the banded resize must equal the dense one exactly"
        assert torch.equal(banded_result[0], pil_result.double()), "PIL's resize must equal ours exactly"
        report["sizes"][f"{width}x{height} -> {out}"] = {
            "dense_ms": round(dense * 1e3, 2), "banded_ms": round(banded * 1e3, 2), "pil_ms": round(pil * 1e3, 2),
            "banded_vs_dense": round(dense / banded, 2), "pil_vs_banded": round(banded / pil, 2)}
    preprocessing._resize_plan.cache_clear()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
