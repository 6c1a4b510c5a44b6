"""Size and time of `artquant report` for synthetic scores: 1,000 and 10,000 rows by default.

    python benchmarks/bench_report.py [--rows 1000 10000] [--unique-images 1000] [--workdir /tmp/artquant-bench-report]

Each row points at a 640 x 480 JPEG photo-like image (gradients, shapes and noise; `--unique-images` distinct
pictures, reused for more rows through hard links, so every row still has its own file and thumbnail). Reported per
report: the page's size (index.html) and the thumbnails' size, per 1,000 images, against two baselines from the
same run: the scores CSV (what the page embeds) and the source images (what the thumbnails stand for); the time
(wall, and CPU of all threads) to write the report the first time (thumbnails made) and again (thumbnails kept),
against decoding every source image once with Pillow (the least any thumbnailer must do).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import shutil
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from artquant.report import write_report

LEVELS = ("excellent", "good", "fair", "poor", "bad")
WEIGHTS = (10.0, 7.5, 5.0, 3.5, 1.0)


def synthetic_image(seed: int, path: Path) -> None:
    rng = random.Random(seed)
    image = Image.linear_gradient("L").resize((640, 480)).convert("RGB")
    tint = Image.new("RGB", image.size, tuple(rng.randrange(256) for _ in range(3)))
    image = Image.blend(image, tint, 0.5)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.randrange(640), rng.randrange(480)
        r = rng.randrange(10, 120)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    noise = Image.effect_noise(image.size, 24).convert("RGB")
    image = Image.blend(image, noise, 0.15).filter(ImageFilter.SMOOTH)
    image.save(path, "JPEG", quality=90)


def synthetic_rows(count: int, images: list[Path], folder: Path) -> list[dict]:
    """Scores of `count` images named like a curation batch; every 100th row failed."""
    rng = random.Random(count)
    rows = []
    for k in range(count):
        path = folder / f"batch_{k // 1000:03d}" / f"img_{k:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            os.link(images[k % len(images)], path)
        if k % 100 == 99:
            rows.append({"path": str(path), "error": "ImageInputError: cannot identify image file"})
            continue
        logits = [rng.gauss(0, 1.5) for _ in LEVELS]
        total = sum(2.718281828 ** v for v in logits)
        probs = [2.718281828 ** v / total for v in logits]
        score = sum(p * w for p, w in zip(probs, WEIGHTS))
        std = sum(p * (w - score) ** 2 for p, w in zip(probs, WEIGHTS)) ** 0.5
        rows.append({"path": str(path), "score": score, "std": std, **{f"p_{n}": p for n, p in zip(LEVELS, probs)}, "error": None})
    return rows


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--unique-images", type=int, default=1000)
    parser.add_argument("--workdir", default="/tmp/artquant-bench-report")
    args = parser.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    sources = work / "sources"
    sources.mkdir(parents=True)
    images = [sources / f"s{k:05d}.jpg" for k in range(args.unique_images)]
    for seed, path in enumerate(images):
        synthetic_image(seed, path)

    results = []
    for count in args.rows:
        rows = synthetic_rows(count, images, work / f"images_{count}")
        scores = work / f"scores_{count}.csv"
        with scores.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[1]))
            writer.writeheader()
            writer.writerows(rows)
        scored_files = [Path(r["path"]) for r in rows if r["error"] is None]

        start, cpu = time.perf_counter(), time.process_time()
        for path in scored_files:  # baseline: decode each source image once
            with Image.open(path) as image:
                image.load()
        decode_s, decode_cpu_s = time.perf_counter() - start, time.process_time() - cpu

        out = work / f"report_{count}"
        start, cpu = time.perf_counter(), time.process_time()  # CPU time of all threads: less moved by other jobs
        page = write_report(scores, out)
        first_s, first_cpu_s = time.perf_counter() - start, time.process_time() - cpu
        start = time.perf_counter()
        write_report(scores, out)
        again_s = time.perf_counter() - start

        per_k = 1000 / count
        result = {
            "rows": count,
            "scored": len(scored_files),
            "page_kib_per_1000": page.stat().st_size / 1024 * per_k,
            "scores_csv_kib_per_1000": scores.stat().st_size / 1024 * per_k,
            "thumbs_kib_per_1000": folder_bytes(out / "thumbs") / 1024 * per_k,
            "sources_kib_per_1000": sum(p.stat().st_size for p in scored_files) / 1024 * per_k,
            "first_write_s": first_s,
            "rewrite_s": again_s,
            "decode_sources_s": decode_s,
            "first_write_cpu_ms_per_image": first_cpu_s / len(scored_files) * 1000,
            "decode_cpu_ms_per_image": decode_cpu_s / len(scored_files) * 1000,
        }
        result["page_over_csv"] = result["page_kib_per_1000"] / result["scores_csv_kib_per_1000"]
        result["thumbs_over_sources"] = result["thumbs_kib_per_1000"] / result["sources_kib_per_1000"]
        result["first_write_over_decode"] = first_s / decode_s
        result["first_write_cpu_over_decode_cpu"] = first_cpu_s / decode_cpu_s
        results.append(result)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}), flush=True)
    print(json.dumps({"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
