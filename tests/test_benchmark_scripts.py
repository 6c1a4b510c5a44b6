"""`benchmarks/run_gpu_benchmarks.sh --tiny`: every script a lent GPU machine runs, on tiny models on this CPU, so a
device session (15 minutes, rarely lent) never fails on a broken script. Nothing here times anything."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ["gpu_score", "prefix_cache", "gpu_reward", "gpu_guidance", "gpu_train", "qrealign_mini", "qrealign_pro"]


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_every_gpu_benchmark_runs_tiny_on_the_cpu(tmp_path, reference_dir):
    pytest.importorskip("diffusers")
    env = {**os.environ, "OUT": str(tmp_path), "ARTQUANT_REFERENCE": str(reference_dir),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # this venv's python
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu_benchmarks.sh"), "--tiny"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    for name in REPORTS:
        assert (tmp_path / f"{name}.txt").stat().st_size > 0, name
    score = json.loads((tmp_path / "gpu_score.json").read_text())
    assert score["rows"] and all(row["images_per_s"] > 0 for row in score["rows"])
    for name in ("qrealign_mini", "qrealign_pro"):
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert report["one_at_a_time_images_per_s"] > 0 and report["speedup"] > 0
