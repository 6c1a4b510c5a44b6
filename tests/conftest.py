"""Shared fixtures: the reference fixture (checkpoint + golden outputs) and scorers built on it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Tests never touch the network: a hub id must fail fast with the offline message, not wait for time-outs.
os.environ["HF_HUB_OFFLINE"] = "1"

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE = REPO_ROOT.parent / "shared" / "fixtures" / "artquant_reference"


def _reference_dir() -> Path | None:
    path = Path(os.environ.get("ARTQUANT_REFERENCE", DEFAULT_REFERENCE))
    return path if (path / "golden.json").is_file() else None


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The reference fixture; skips (or fails, with ARTQUANT_REQUIRE_FIXTURES=1) when it is absent."""
    path = _reference_dir()
    if path is None:
        reason = f"reference fixture not found (set ARTQUANT_REFERENCE; looked at {DEFAULT_REFERENCE})"
        if os.environ.get("ARTQUANT_REQUIRE_FIXTURES") == "1":
            pytest.fail(reason + " and ARTQUANT_REQUIRE_FIXTURES=1")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def golden(reference_dir) -> dict:
    return json.loads((reference_dir / "golden.json").read_text())


@pytest.fixture(scope="session")
def golden_tensors(reference_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(reference_dir / "golden.safetensors"))


@pytest.fixture(scope="session")
def reference_images(reference_dir, golden) -> list[Path]:
    return [reference_dir / "images" / name for name in golden["images"]]


@pytest.fixture(scope="session")
def base_scorer(reference_dir):
    from artquant import ArtQuantScorer

    return ArtQuantScorer.from_pretrained(reference_dir / "mplug_owl2_base", device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def lora_scorer(reference_dir):
    from artquant import ArtQuantScorer

    return ArtQuantScorer.from_pretrained(reference_dir / "artquant_lora", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: one thread is as fast, immune to a busy machine, and sums in a fixed order."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


QREALIGN_DIR = REPO_ROOT / "tests" / "data" / "qrealign_tiny"  # a tiny random Qwen3.5-VL (tests/qrealign_tiny.py)
QREALIGN_IMAGES = REPO_ROOT / "tests" / "data" / "qrealign_images"


@pytest.fixture(scope="session")
def qrealign_dir() -> Path:
    return QREALIGN_DIR


@pytest.fixture(scope="session")
def qrealign_images(qrealign_golden) -> list[Path]:
    """The golden images, in the golden file's order (sizes from 9 x 900 to 300 x 220)."""
    return [QREALIGN_IMAGES / name for name in qrealign_golden["scores"]["quality"]]


@pytest.fixture(scope="session")
def qrealign_golden() -> dict:
    """Scores of the tiny Q-ReAlign checkpoint by the authors' code (tests/data/make_qrealign_golden.py)."""
    return json.loads((REPO_ROOT / "tests" / "data" / "qrealign_golden.json").read_text())


@pytest.fixture(scope="session")
def qrealign_scorer():
    """The Q-ReAlign quality preset on the tiny checkpoint (fp32, CPU)."""
    from artquant import ArtQuantScorer

    return ArtQuantScorer.from_pretrained(QREALIGN_DIR, preset="qrealign-mini-quality", device="cpu", dtype="fp32")
