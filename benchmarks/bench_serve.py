"""The reward server under load: images/s and request latency (p50/p99) at 1, 8 and 32 concurrent clients, against
in-process `scorer.score` on the same images in the same run.

    python benchmarks/bench_serve.py                               # this CPU, the fixture's tiny model
    python benchmarks/bench_serve.py --shape 7b --replicas 1 2 --gpus-per-replica 1 0.5 --max-batch-size 8 32
                                                                    # GPU: 7B-shaped random weights (gpu_serve.py)

Each client sends `--images-per-request` PNGs per request, back to back, for `--requests` requests. The server is
started with the CLI (`artquant serve`, loopback, random port) and stopped at the end.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "artquant_reference"
sys.path.insert(0, str(ROOT))  # the client, importable without installing it

from client import RemoteReward  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, dtype: str, port: int, extra: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "artquant.cli", "serve", "--model", model, "--dtype", dtype, "--port", str(port), *extra]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return process
        except OSError:
            if process.poll() is not None:
                raise SystemExit(f"the server exited with {process.returncode}")
            time.sleep(0.5)
    raise SystemExit("the server did not come up in 10 minutes")


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(120)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def load(url: str, images: list[np.ndarray], clients: int, requests: int, per_request: int) -> dict:
    """Every client sends `requests` requests of `per_request` images; latency per request, throughput overall."""
    reward = RemoteReward(url, batch_size=per_request, concurrency=1, retries=0)
    latencies: list[float] = []

    def client(index: int):
        for r in range(requests):
            start = (index * requests + r) * per_request % len(images)
            chunk = [images[(start + k) % len(images)] for k in range(per_request)]
            began = time.perf_counter()
            reward.score(chunk)
            latencies.append(time.perf_counter() - began)

    client(0)  # warm-up: the first batch also compiles/allocates
    latencies.clear()
    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    elapsed = time.perf_counter() - began
    return {
        "clients": clients,
        "images_per_s": clients * requests * per_request / elapsed,
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
    }


def in_process(model: str, dtype: str, images: list[np.ndarray], per_request: int, batch_size: int, repeats: int) -> dict:
    """The baseline: `scorer.score` in this process, one call per request-sized chunk and one big call."""
    import torch

    from artquant import ArtQuantScorer

    scorer = ArtQuantScorer.from_pretrained(model, dtype=dtype)
    pils = [Image.fromarray(a) for a in images]
    scorer.score(pils[:per_request])
    calls = []
    for _ in range(repeats):
        began = time.perf_counter()
        scorer.score(pils[:per_request], batch_size=per_request)
        calls.append(time.perf_counter() - began)
    began = time.perf_counter()
    scorer.score(pils, batch_size=batch_size)
    rate = len(pils) / (time.perf_counter() - began)
    del scorer
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"images_per_s": rate, "p50_ms": 1000 * float(np.median(calls)), "threads": torch.get_num_threads()}


def random_checkpoint(shape: str, folder: str) -> str:
    """A random mPLUG-Owl2 of `shape` (benchmarks/gpu_common.py) saved as a checkpoint folder the server loads, with
    the fixture's LLaMA-2 tokenizer."""
    import shutil

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_common import random_model

    from artquant.scorer import ImageProcessingConfig

    model = random_model(shape == "tiny", torch.bfloat16 if torch.cuda.is_available() else torch.float32, torch.device("cpu"), shape=shape)
    model.save_pretrained(folder)
    size = model.config.vision_config.image_size
    Path(folder, "preprocessor_config.json").write_text(json.dumps(ImageProcessingConfig(resize_to=size, crop_size=size).to_dict()))
    shutil.copyfile(FIXTURE / "mplug_owl2_base" / "tokenizer.model", Path(folder, "tokenizer.model"))
    del model
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(FIXTURE / "mplug_owl2_base"))
    parser.add_argument("--shape", choices=["tiny", "quarter", "7b"], help="random weights of this shape instead of --model")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--images-per-request", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1])
    parser.add_argument("--gpus-per-replica", type=float, nargs="+", default=[1.0], help="paired with --replicas")
    parser.add_argument("--max-batch-size", type=int, nargs="+", default=[16])
    parser.add_argument("--batch-wait-timeout", type=float, default=0.01)
    parser.add_argument("--cpus-per-replica", type=float, default=1)
    parser.add_argument("--out", help="JSON report")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8) for _ in range(64)]
    with tempfile.TemporaryDirectory() as folder:
        model = random_checkpoint(args.shape, folder) if args.shape else args.model
        report = {"baseline": in_process(model, args.dtype, images, args.images_per_request, max(args.max_batch_size), 7), "server": []}
        print("in-process:", json.dumps(report["baseline"]), flush=True)
        for (replicas, gpus), batch in itertools.product(zip(args.replicas, args.gpus_per_replica), args.max_batch_size):
            port = free_port()
            extra = ["--replicas", str(replicas), "--gpus-per-replica", str(gpus), "--cpus-per-replica", str(args.cpus_per_replica),
                     "--max-batch-size", str(batch), "--batch-wait-timeout", str(args.batch_wait_timeout),
                     "--max-ongoing-requests", "64", "--max-queued-requests", "1024"]
            began = time.perf_counter()
            process = start_server(model, args.dtype, port, extra)
            startup = time.perf_counter() - began
            try:
                for clients in args.clients:
                    row = {"replicas": replicas, "gpus_per_replica": gpus, "max_batch_size": batch, "startup_s": startup,
                           **load(f"http://127.0.0.1:{port}", images, clients, args.requests, args.images_per_request)}
                    row["ratio_to_in_process"] = row["images_per_s"] / report["baseline"]["images_per_s"]
                    report["server"].append(row)
                    print(json.dumps(row), flush=True)
            finally:
                stop_server(process)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
