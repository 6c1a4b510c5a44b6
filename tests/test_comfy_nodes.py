"""The ComfyUI nodes called directly, as ComfyUI would, with IMAGE batches [B, H, W, 3] in [0, 1] and the fixture.

ComfyUI itself is absent here, so the memory-management path is the plain torch one (see test_comfy_integration.py
for a real ComfyUI).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from artquant.artquant_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from artquant.artquant_nodes.model_handle import ArtQuantModel
from artquant.artquant_nodes.nodes import (
    NO_LOCAL_MODEL,
    ArtQuantDescribe,
    ArtQuantFilter,
    ArtQuantLoader,
    ArtQuantRank,
    ArtQuantScore,
    ArtQuantScoreOverlay,
)
from artquant.scorer import CheckpointError
from PIL import Image


def comfy_image(path) -> torch.Tensor:
    """What ComfyUI's LoadImage gives: RGB float [1, H, W, 3] in [0, 1]."""
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255)[None]


@pytest.fixture(scope="module")
def handle(lora_scorer) -> ArtQuantModel:
    return ArtQuantModel(lora_scorer)


@pytest.fixture(scope="module")
def batch16() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(16, 48, 40, 3, generator=generator)


@pytest.fixture(scope="module")
def batch16_scores(handle, batch16) -> list[float]:
    return ArtQuantScore().score(handle, batch16, batch_size=8)[0]


def test_every_node_is_documented_and_consistent():
    assert set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS)
    for name, node in NODE_CLASS_MAPPINGS.items():
        assert node.CATEGORY == "ArtQuant", name
        assert node.DESCRIPTION and callable(getattr(node, node.FUNCTION)), name
        for section in node.INPUT_TYPES().values():
            for input_name, (_, options) in section.items():
                assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"
        assert len(node.RETURN_NAMES) == len(node.RETURN_TYPES) == len(node.OUTPUT_TOOLTIPS), name
        assert len(getattr(node, "OUTPUT_IS_LIST", node.RETURN_TYPES)) == len(node.RETURN_TYPES), name


def test_pack_imports_without_comfyui():
    code = "import sys, artquant.artquant_nodes as n; assert n.NODE_CLASS_MAPPINGS; print(any(m.split('.')[0] in ('comfy', 'folder_paths') for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_loader_loads_once_and_scores_like_the_reference(reference_dir, reference_images, golden):
    loader = ArtQuantLoader()
    release = str(reference_dir / "artquant_lora")
    arguments = {"preset": "artquant", "model": NO_LOCAL_MODEL, "dtype": "fp32", "device": "cpu", "model_id": release}
    (handle,) = loader.load(**arguments)
    assert loader.load(**arguments)[0] is handle  # cached: no reload per execution
    assert handle.patcher is None and handle.ready().device == torch.device("cpu")
    scores = [ArtQuantScore().score(handle, comfy_image(path))[0][0] for path in reference_images]
    np.testing.assert_allclose(scores, golden["lora_scores"], atol=1e-4)


def test_score_outputs_one_score_and_std_per_image(handle, batch16, batch16_scores):
    scores, stds, report = ArtQuantScore().score(handle, batch16[:3])
    assert len(scores) == len(stds) == 3
    assert all(1.0 <= s <= 10.0 for s in scores) and all(s > 0 for s in stds)
    assert report.count("\n") == 3 and f"{scores[2]:.3f}" in report
    assert report.splitlines()[0].endswith(("(excellent)", "(good)", "(fair)", "(poor)", "(bad)"))
    np.testing.assert_allclose(scores, batch16_scores[:3], atol=1e-5)


def test_scores_do_not_depend_on_the_batch(handle, batch16, batch16_scores):
    alone = [ArtQuantScore().score(handle, batch16[i : i + 1])[0][0] for i in (0, 7, 15)]
    np.testing.assert_allclose(alone, [batch16_scores[i] for i in (0, 7, 15)], atol=1e-5)
    whole = ArtQuantScore().score(handle, batch16, batch_size=16)[0]
    np.testing.assert_allclose(whole, batch16_scores, atol=1e-5)
    shuffled = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(ArtQuantScore().score(handle, batch16[shuffled])[0], np.array(batch16_scores)[shuffled], atol=1e-5)


def test_rank_sorts_best_first_and_reorders_latent_and_mask(handle, batch16, batch16_scores):
    batch = batch16[:6]
    latent = {"samples": torch.arange(6.0).view(6, 1, 1, 1).expand(6, 4, 6, 5).clone()}
    mask = torch.arange(6.0).view(6, 1, 1).expand(6, 48, 40).clone()
    ranked, top, rest, scores, ranked_latent, ranked_mask = ArtQuantRank().rank(handle, batch, top_k=2, latent=latent, mask=mask)
    order = np.argsort(-np.array(batch16_scores[:6]), kind="stable")
    torch.testing.assert_close(ranked, batch[order])
    torch.testing.assert_close(top, batch[order[:2]])
    torch.testing.assert_close(rest, batch[order[2:]])
    np.testing.assert_allclose(scores, np.array(batch16_scores[:6])[order], atol=1e-5)
    assert scores == sorted(scores, reverse=True)
    assert ranked_latent["samples"][:, 0, 0, 0].tolist() == order.tolist()
    assert ranked_mask[:, 0, 0].tolist() == order.tolist()


def test_rank_rejects_a_latent_of_another_batch(handle, batch16):
    with pytest.raises(ValueError, match="latent batch has 2 items but the images 3"):
        ArtQuantRank().rank(handle, batch16[:3], top_k=1, latent={"samples": torch.zeros(2, 4, 6, 5)})


def test_rank_with_k_covering_the_batch_leaves_rest_empty(handle, batch16):
    ranked, top, rest, *_ = ArtQuantRank().rank(handle, batch16[:1], top_k=5)
    assert top.shape[0] == ranked.shape[0] == 1 and rest.shape == (0, 48, 40, 3)


def test_filter_keeps_images_at_or_above_the_threshold(handle, batch16, batch16_scores):
    batch, scores = batch16[:8], np.array(batch16_scores[:8])
    threshold = float(np.median(scores))
    kept, rejected, count, report = ArtQuantFilter().filter(handle, batch, threshold)
    expected = scores >= threshold
    assert count == expected.sum() == kept.shape[0]
    torch.testing.assert_close(kept, batch[torch.from_numpy(expected)])
    torch.testing.assert_close(rejected, batch[torch.from_numpy(~expected)])
    assert f"{count} of 8" in report


def test_filter_says_so_when_no_image_passes(handle, batch16, batch16_scores):
    kept, rejected, count, report = ArtQuantFilter().filter(handle, batch16[:4], max(batch16_scores[:4]) + 0.01)
    assert count == 0 and kept.shape == (0, 48, 40, 3) and rejected.shape[0] == 4
    assert report.startswith("None of the 4 images")


def test_overlay_draws_in_the_corner_only(handle, batch16):
    (drawn,) = ArtQuantScoreOverlay().overlay(handle, batch16[:2])
    assert drawn.shape == (2, 48, 40, 3)
    assert not torch.allclose(drawn[:, :6, :6], batch16[:2, :6, :6])
    torch.testing.assert_close(drawn[:, -8:, -8:], (batch16[:2, -8:, -8:] * 255).round() / 255)


def test_describe_returns_text(handle, batch16):
    (text,) = ArtQuantDescribe().describe(handle, batch16[:2], max_new_tokens=4)
    assert text.startswith("Image 0: ") and "\n\nImage 1: " in text


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.zeros(0, 8, 8, 3), "batch is empty"),
        (torch.full((2, 8, 8, 3), 0.5).index_fill_(0, torch.tensor([1]), float("nan")), r"image 0\[1\]: .*NaN.* Fix or remove"),
        (torch.rand(1, 8, 8, 1), "grey"),
        (torch.rand(1, 8, 8, 4), "4-channel"),
        (torch.rand(8, 8, 3), r"\[B, H, W, 3\]"),
        (torch.full((1, 8, 8, 3), 2.0), "must be in \\[0, 1\\]"),
    ],
)
def test_bad_images_raise_a_message_that_says_what_to_do(handle, images, message):
    for node, arguments in ((ArtQuantScore(), {}), (ArtQuantRank(), {"top_k": 1}), (ArtQuantFilter(), {"threshold": 5.0})):
        with pytest.raises(ValueError, match=message):
            getattr(node, node.FUNCTION)(handle, images, **arguments)


def test_describe_rejects_nan_images(handle):
    with pytest.raises(ValueError, match=r"Images \[0\] .* NaN"):
        ArtQuantDescribe().describe(handle, torch.full((1, 8, 8, 3), float("nan")), max_new_tokens=2)


def test_missing_model_and_empty_model_folder_raise_clear_errors(tmp_path):
    loader = ArtQuantLoader()
    with pytest.raises(CheckpointError, match="neither a checkpoint folder nor a Hugging Face id"):
        loader.load("artquant", NO_LOCAL_MODEL, "fp32", "cpu", model_id=str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        loader.load("artquant", NO_LOCAL_MODEL, "fp32", "cpu", model_id=str(tmp_path))
    with pytest.raises(CheckpointError, match="no checkpoint folder 'ArtQuant' in models/artquant/"):
        loader.load("artquant", "ArtQuant", "fp32", "cpu")
    with pytest.raises(CheckpointError, match="No ArtQuant model chosen"):
        loader.load("artquant", NO_LOCAL_MODEL, "fp32", "cpu")
    (tmp_path / "config.json").write_text('{"model_type": "mplug_owl2"}')
    with pytest.raises(CheckpointError, match="Could not load an mPLUG-Owl2 checkpoint"):
        loader.load("artquant", NO_LOCAL_MODEL, "fp32", "cpu", model_id=str(tmp_path))
