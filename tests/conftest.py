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
