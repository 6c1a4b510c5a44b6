"""Peak memory of the image input path: one 100-megapixel image, and 40 large files scored at batch size 2.

Each case runs in a fresh process and reports its peak RSS above the RSS it had after its imports. Cases:

* `decode`: PIL's own `Image.open(p).load()` of the image, the floor any exact path pays;
* `before`: the input path as it was at `--baseline-rev` (git history), read from git into a temporary folder:
  every path decoded first (`load_images`), then preprocessed batch by batch with float64 copies of each image;
* `after`: this tree's `iter_pixel_batches`, what `ArtQuantScorer.score` runs (decode per batch, banded resize).

The model is left out: its forward pass is the same in both paths. Only pixels are measured.

    python benchmarks/bench_memory.py                 # 100 MP JPEG + 40 x 7.2 MP JPEGs, batch size 2
    python benchmarks/bench_memory.py --megapixels 4 --files 8 --file-megapixels 1   # quick
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import importlib.util, json, resource, sys, types
from pathlib import Path

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20

case, paths, batch_size, source = sys.argv[1], sys.argv[2].split("|"), int(sys.argv[3]), sys.argv[4]
import numpy, torch, PIL.Image  # imported before the baseline so that only pixels are counted
torch.set_num_threads(1)
if case == "after" or case == "before":
    package = types.ModuleType("pkg"); package.__path__ = [source]; sys.modules["pkg"] = package
    for name in ("images", "preprocessing"):
        spec = importlib.util.spec_from_file_location(f"pkg.{name}", f"{source}/{name}.py")
        module = importlib.util.module_from_spec(spec); sys.modules[f"pkg.{name}"] = module; spec.loader.exec_module(module)
    images, preprocessing = sys.modules["pkg.images"], sys.modules["pkg.preprocessing"]
    config = preprocessing.ImageProcessingConfig()
    preprocessing.pixel_values_from_images(torch.zeros(1, 3, 64, 48, dtype=torch.uint8), config)  # torch's kernels load
start = rss_mib()
if case == "decode":
    for path in paths:
        with PIL.Image.open(path) as image:
            image.load()
elif case == "before":  # the old score(): load_images(everything), then one batch at a time
    loaded = images.load_images(paths)
    for first in range(0, len(loaded), batch_size):
        torch.cat([preprocessing.pixel_values_from_images(x[None], config) for x in loaded[first : first + batch_size]])
else:
    for batch in preprocessing.iter_pixel_batches(paths, config, batch_size):
        assert all(error is None for error in batch.errors), batch.errors
# VmHWM: this process image's own peak (ru_maxrss would start from the forking parent's RSS)
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps({"peak_above_start_mib": round(peak - start)}))
"""


def make_jpeg(path: Path, megapixels: float, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = int(megapixels * 1e6 / width)
    rows = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    columns = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    base = ((rows + columns) / 2).astype(np.uint8)
    noise = np.random.default_rng(seed).integers(0, 32, (height, width), dtype=np.uint8)
    Image.merge("RGB", [Image.fromarray(base + noise), Image.fromarray(base), Image.fromarray(255 - base)]).save(
        path, quality=90
    )


def baseline_source(revision: str, folder: Path) -> Path:
    """The input path's two modules as they were at `revision`, from git (nothing is copied into the tree)."""
    target = folder / "baseline"
    target.mkdir()
    for name in ("images", "preprocessing"):
        text = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:scorer/{name}.py"], check=True,
                              capture_output=True, text=True).stdout
        (target / f"{name}.py").write_text(text)
    return target


def measure(case: str, paths: list[Path], batch_size: int, source: Path) -> int:
    result = subprocess.run([sys.executable, "-c", CHILD, case, "|".join(map(str, paths)), str(batch_size), str(source)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        return -1 if "MemoryError" in result.stderr or result.returncode < 0 else sys.exit(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_above_start_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=100)
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--file-megapixels", type=float, default=7.2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--baseline-rev", default="3a5e1fb", help="git revision of the old input path")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        old, new = baseline_source(args.baseline_rev, folder), REPO / "scorer"
        big = folder / "big.jpg"
        make_jpeg(big, args.megapixels)
        large = folder / "large.jpg"
        make_jpeg(large, args.file_megapixels, seed=1)
        many = [large] * args.files
        print(f"| case | decode (PIL's floor) | before ({args.baseline_rev}) | after | before / after |")
        print("| --- | --- | --- | --- | --- |")
        for label, paths, batch_size in [(f"one {args.megapixels:g} MP JPEG", [big], 1),
                                         (f"{args.files} x {args.file_megapixels:g} MP JPEGs, batch {args.batch_size}",
                                          many, args.batch_size)]:
            floor = measure("decode", paths[:1], batch_size, new)
            before = measure("before", paths, batch_size, old)
            after = measure("after", paths, batch_size, new)
            print(f"| {label} | {floor} MiB | {before} MiB | {after} MiB | {before / max(after, 1):.1f}x |", flush=True)
    print("\npeak RSS above each process's RSS after its imports (pixels only; the model is the same in both paths)")


if __name__ == "__main__":
    main()
