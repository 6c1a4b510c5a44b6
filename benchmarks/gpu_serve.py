"""GPU: the reward server with a 7B-shaped random mPLUG-Owl2 (bf16), replicas x max batch size, against in-process
`scorer.score` in the same run. `--tiny` runs the same grid on the CPU with a tiny random model (a smoke test).

    python benchmarks/gpu_serve.py            # one GPU: 1 replica, and 2 replicas sharing it; batch 8 and 32
    python benchmarks/gpu_serve.py --tiny
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    tiny = "--tiny" in sys.argv[1:]
    rest = [a for a in sys.argv[1:] if a != "--tiny"]
    grid = ["--replicas", "1", "2", "--gpus-per-replica", "1", "0.5", "--max-batch-size", "8", "32",
            "--clients", "1", "8", "32", "--images-per-request", "8", "--requests", "4"]
    shape = ["--shape", "tiny", "--dtype", "fp32", "--image-size", "64", "--requests", "2"] if tiny else ["--shape", "7b", "--dtype", "bf16", "--image-size", "1024"]
    sys.exit(subprocess.call([sys.executable, str(HERE / "bench_serve.py"), *grid, *shape, *rest]))
