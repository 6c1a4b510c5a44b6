"""The logic below the ComfyUI nodes, called as the nodes call it, without ComfyUI (CI has none): model lifetime and
sharing, scoring/ranking/filtering/describing IMAGE batches [B, H, W, 3] in [0, 1], and the reward guidance step.

The node paths run on two model families: ArtQuant's LoRA release (mPLUG-Owl2) and the tiny Q-ReAlign checkpoint
(Qwen3.5-VL, scores 0 .. 1). The V3 node classes themselves, the memory management and the guided samplers run in a
real ComfyUI in test_comfy_integration.py.
"""

from __future__ import annotations

import gc
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from artquant.artquant_nodes import guidance, model_handle
from artquant.artquant_nodes.model_handle import IMAGE_TOKENS, WEIGHTS, ArtQuantModel, folder_fingerprint, load_model
from artquant.artquant_nodes.operations import (
    check_images,
    check_threshold,
    describe_images,
    filter_mask,
    overlay_scores,
    rank_batch,
    reorder_latent,
    reorder_mask,
    score_images,
    score_report,
)
from artquant.scorer import PRESETS, ArtQuantScorer, CheckpointError, ImageProcessingConfig
from artquant.scorer.qwen_vl import QwenImageConfig
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is as fast and sums in a fixed order


def comfy_image(path) -> torch.Tensor:
    """What ComfyUI's LoadImage gives: RGB float [1, H, W, 3] in [0, 1]."""
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255)[None]


SCORERS = {"artquant": "lora_scorer", "qrealign-mini-quality": "qrealign_scorer"}  # preset -> conftest fixture


@pytest.fixture(scope="module", params=list(SCORERS))
def scorer(request) -> ArtQuantScorer:
    """Each node path runs on ArtQuant (mPLUG-Owl2 LoRA release) and on Q-ReAlign (tiny Qwen3.5-VL)."""
    return request.getfixturevalue(SCORERS[request.param])


@pytest.fixture(scope="module")
def handle(scorer) -> ArtQuantModel:
    return ArtQuantModel.from_scorer(scorer)


@pytest.fixture(scope="module")
def qrealign_handle(qrealign_scorer) -> ArtQuantModel:
    return ArtQuantModel.from_scorer(qrealign_scorer)


@pytest.fixture(scope="module")
def batch16() -> torch.Tensor:
    return torch.rand(16, 48, 40, 3, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def batch16_scores(scorer, batch16) -> list[float]:
    return [r.score for r in scorer.score(batch16, layout="BHWC")]


@pytest.fixture(scope="module")
def reference_scores(scorer, request) -> tuple[list[Path], list[float]]:
    """(images, the golden scores of `scorer`'s preset on them): the fixture's for ArtQuant, the authors' code's for
    Q-ReAlign."""
    if scorer.preset.family == "qwen_vl":
        paths = request.getfixturevalue("qrealign_images")
        return paths, [request.getfixturevalue("qrealign_golden")["scores"]["quality"][p.name] for p in paths]
    return request.getfixturevalue("reference_images"), request.getfixturevalue("golden")["lora_scores"]


# ------------------------------------------------------------------------------------------------------------------
# The package and its one ComfyUI export
# ------------------------------------------------------------------------------------------------------------------
def test_pack_imports_without_comfyui_and_exports_only_the_v3_entry_point():
    code = (
        "import sys, inspect, artquant, artquant.artquant_nodes as n;"
        "print(inspect.iscoroutinefunction(artquant.comfy_entrypoint), hasattr(artquant, 'NODE_CLASS_MAPPINGS'),"
        " hasattr(n, 'NODE_CLASS_MAPPINGS'), any(m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths') for m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False", "False", "False"]


# ------------------------------------------------------------------------------------------------------------------
# Model lifetime: one copy per checkpoint files + dtype + device + quantization, held only by ComfyUI
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def release_copy(tmp_path, reference_dir):
    """A private copy of the LoRA release and its base (the release records its base as ../mplug_owl2_base)."""
    for name in ("artquant_lora", "mplug_owl2_base"):
        shutil.copytree(reference_dir / name, tmp_path / name)
    return tmp_path / "artquant_lora"


def test_presets_share_one_copy_of_the_weights_and_score_as_if_loaded_with_them(release_copy, reference_images):
    artquant = load_model(str(release_copy), None, "artquant", "fp32", "cpu")
    deqa = load_model(str(release_copy), None, "deqa-score", "fp32", "cpu")
    assert deqa.weights is artquant.weights and deqa.scorer.model is artquant.scorer.model
    loaded_with_preset = ArtQuantScorer.from_pretrained(release_copy, preset="deqa-score", dtype="fp32", device="cpu")
    expected = [r.score for r in loaded_with_preset.score(reference_images[:2])]
    got = [r.score for r in deqa.scorer.score(reference_images[:2])]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    low, high = PRESETS["deqa-score"].score_range
    assert all(low <= s <= high for s in got)
    assert load_model(str(release_copy), None, "artquant", "fp16", "cpu").weights is not artquant.weights  # dtype: own copy


def test_qrealign_presets_share_one_copy_and_score_as_the_authors_code(qrealign_dir, qrealign_images, qrealign_golden):
    quality = load_model(str(qrealign_dir), None, "qrealign-mini-quality", "fp32", "cpu")
    aesthetics = load_model(str(qrealign_dir), None, "qrealign-mini-aesthetics", "fp32", "cpu")
    assert aesthetics.weights is quality.weights and aesthetics.scorer.model is quality.scorer.model
    images = qrealign_images[:2]
    for model, task in ((quality, "quality"), (aesthetics, "aesthetics")):
        got = [score_images(model, comfy_image(path))[0].score for path in images]
        np.testing.assert_allclose(got, [qrealign_golden["scores"][task][p.name] for p in images], atol=1e-4)
        assert all(0.0 <= s <= 1.0 for s in got)


def test_the_cache_never_keeps_weights_alive(release_copy):
    model = load_model(str(release_copy), None, "artquant", "fp32", "cpu")
    held = len(WEIGHTS)
    network = model.scorer.model
    del model
    gc.collect()
    assert len(WEIGHTS) == held - 1
    assert load_model(str(release_copy), None, "artquant", "fp32", "cpu").scorer.model is not network


def test_a_replaced_checkpoint_folder_loads_anew(release_copy, tmp_path):
    before = folder_fingerprint(str(release_copy))
    old = load_model(str(release_copy), None, "artquant", "fp32", "cpu")
    assert folder_fingerprint(str(release_copy)) == before  # stable while nothing changes
    assert load_model(str(release_copy), None, "artquant", "fp32", "cpu").weights is old.weights
    replacement = tmp_path / "replacement"
    shutil.copytree(release_copy, replacement)
    shutil.rmtree(release_copy)
    replacement.rename(release_copy)
    assert folder_fingerprint(str(release_copy)) != before
    assert load_model(str(release_copy), None, "artquant", "fp32", "cpu").weights is not old.weights


def test_memory_required_grows_with_the_batch_and_the_kept_graph(handle):
    one, eight = handle.weights.memory_required(1), handle.weights.memory_required(8)
    assert eight == 8 * one > 0
    assert handle.weights.memory_required(1, keep_graph=True) > one


def test_memory_required_follows_the_image_size_where_the_token_count_does(handle):
    small, large = (handle.weights.memory_required(1, image_size=size) for size in ((64, 64), (2048, 2048)))
    grows = handle.scorer.preset.family == "qwen_vl"  # dynamic resolution; mPLUG-Owl2 crops every image to one size
    assert (large > small) if grows else (large == small)


@pytest.mark.parametrize(
    ("family", "image_config", "size", "tokens"),
    [
        # mPLUG-Owl2: 448 px crop / 14 px patches = 1024 + the class token; the abstractor gives 64 queries + vit_eos.
        ("mplug_owl2", ImageProcessingConfig(), (1024, 768), (1025, 65)),
        ("mplug_owl2", ImageProcessingConfig(), (64, 64), (1025, 65)),
        # Qwen3.5-VL: 16 px patches, 2 x 2 merged into one LLM token (one per 32 x 32 pixels), within the pixel budget.
        ("qwen_vl", QwenImageConfig(), (1024, 1024), (4096, 1024)),
        ("qwen_vl", QwenImageConfig(), (64, 64), (256, 64)),  # raised to min_pixels (256 x 256)
        ("qwen_vl", QwenImageConfig(max_pixels=512 * 512), (2048, 2048), (1024, 256)),
    ],
)
def test_image_tokens_of_each_family(family, image_config, size, tokens):
    config = type("Config", (), {"num_visual_tokens": 65, "vision_config": type("Vision", (), {"patch_size": 14})})
    assert IMAGE_TOKENS[family](config, image_config, *size) == tokens


def test_outside_comfyui_there_is_no_patcher_and_ready_returns_the_scorer(handle):
    assert handle.patcher is None and handle.ready(4) is handle.scorer


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("{tmp}/missing", "neither a checkpoint folder nor a Hugging Face id"),
        ("{tmp}", "holds no checkpoint"),
        ("ArtQuant", "no checkpoint folder 'ArtQuant' in models/artquant/"),
        ("", "No ArtQuant model chosen"),
    ],
)
def test_missing_models_raise_clear_errors(tmp_path, model, message):
    with pytest.raises(CheckpointError, match=message):
        load_model(model_handle.resolve_checkpoint(model.format(tmp=tmp_path)), None, "artquant", "fp32", "cpu")


def test_checkpoint_lists_tell_full_checkpoints_from_lora_releases(reference_dir, qrealign_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    for name in ("artquant_lora", "mplug_owl2_base"):
        (tmp_path / name).symlink_to(reference_dir / name, target_is_directory=True)
    (tmp_path / "Q-ReAlign-Mini").symlink_to(qrealign_dir, target_is_directory=True)
    assert model_handle.checkpoint_folders([tmp_path]) == ["Q-ReAlign-Mini", "artquant_lora", "mplug_owl2_base"]
    assert model_handle.checkpoint_folders([tmp_path], full_only=True) == ["Q-ReAlign-Mini", "mplug_owl2_base"]
    assert model_handle.resolve_checkpoint(str(tmp_path / "Q-ReAlign-Mini")) == str(tmp_path / "Q-ReAlign-Mini")


@pytest.fixture
def qrealign_copy(tmp_path, qrealign_dir):
    return Path(shutil.copytree(qrealign_dir, tmp_path / "qrealign_tiny"))


@pytest.mark.parametrize(
    ("model", "preset", "base", "message"),
    [
        ("qrealign", "artquant", None, r"not mplug_owl2.*choose a qrealign-\* preset"),
        ("qrealign", "deqa-score", None, r"not mplug_owl2.*choose a qrealign-\* preset"),
        ("release", "qrealign-mini-quality", None, "not a Qwen-VL model.*choose a preset of its family"),
        ("base", "qrealign-lite-aesthetics", None, "not a Qwen-VL model.*choose a preset of its family"),
        ("qrealign", "qrealign-mini-quality", "base", "`base` is not used: leave it out"),
        ("qrealign without preprocessor_config.json", "qrealign-mini-quality", None,
         "preprocessor_config.json.*download the whole checkpoint again"),
        ("qrealign without chat_template.jinja", "qrealign-mini-quality", None, "has no chat template"),
        ("qrealign", "qrealign-max-quality", None, "Unknown preset 'qrealign-max-quality'; choose one of"),
    ],
)
def test_a_preset_of_another_family_than_the_checkpoint_is_a_clear_error(release_copy, qrealign_copy, model, preset,
                                                                        base, message):
    folders = {"qrealign": qrealign_copy, "release": release_copy, "base": release_copy.parent / "mplug_owl2_base"}
    folder = folders[model.split()[0]]
    if " without " in model:
        (folder / model.split(" without ")[1]).unlink()
    with pytest.raises((CheckpointError, ValueError), match=message):
        load_model(str(folder), str(folders[base]) if base else None, preset, "fp32", "cpu")


@pytest.mark.parametrize(
    ("loaded", "preset", "message"),
    [
        ("qrealign-mini-quality", "artquant", "qrealign_tiny is loaded as a qwen_vl model, but the artquant preset is "
         "of family mplug_owl2: choose one of qrealign-mini-quality, qrealign-mini-aesthetics, .*qrealign-pro-aesthetics "
         r"for it, or load a mplug_owl2 checkpoint \(such as Liuuuu123/ArtQuant\)"),
        ("artquant", "qrealign-pro-quality", "artquant_lora is loaded as a mplug_owl2 model, but the qrealign-pro-quality "
         "preset is of family qwen_vl: choose one of artquant, deqa-score, onealign-quality, onealign-aesthetics for it"),
    ],
)
def test_loaded_weights_are_never_shared_with_a_preset_of_another_family(release_copy, qrealign_copy, loaded, preset,
                                                                          message):
    folder = qrealign_copy if PRESETS[loaded].family == "qwen_vl" else release_copy
    held = load_model(str(folder), None, loaded, "fp32", "cpu")  # the copy another loader would share
    with pytest.raises(CheckpointError, match=message):
        load_model(str(folder), None, preset, "fp32", "cpu")
    with pytest.raises(CheckpointError, match=message):
        held.weights.scorer(preset)


# ------------------------------------------------------------------------------------------------------------------
# Scoring, ranking (best-of-N), filtering, describing
# ------------------------------------------------------------------------------------------------------------------
def test_scores_equal_the_reference(handle, reference_scores):
    paths, expected = reference_scores
    scores = [score_images(handle, comfy_image(path))[0].score for path in paths]
    np.testing.assert_allclose(scores, expected, atol=1e-4)
    low, high = handle.scorer.preset.score_range
    assert all(low <= s <= high for s in scores)


def test_scores_do_not_depend_on_the_batch(handle, batch16, batch16_scores):
    # Batch shapes change the summation order: equal within 1e-5, never exactly.
    alone = [score_images(handle, batch16[i : i + 1])[0].score for i in (0, 7, 15)]
    np.testing.assert_allclose(alone, [batch16_scores[i] for i in (0, 7, 15)], atol=1e-5)
    whole = [r.score for r in score_images(handle, batch16, batch_size=16)]
    np.testing.assert_allclose(whole, batch16_scores, atol=1e-5)


def test_report_has_a_line_per_image_and_the_model_answer(handle, batch16, batch16_scores):
    report = score_report(score_images(handle, batch16[:3]))
    assert report.count("\n") == 3 and f"{batch16_scores[2]:.3f}" in report
    assert report.splitlines()[0].endswith(tuple(f"({word})" for word in handle.scorer.preset.level_names))


def test_rank_orders_best_first_and_keeps_each_latent_with_its_noise_index(handle, batch16, batch16_scores):
    ranking = rank_batch(handle, batch16[:6], top_k=2)
    order = np.argsort(-np.array(batch16_scores[:6]), kind="stable")
    assert ranking.order.tolist() == order.tolist() and ranking.top_k == 2
    np.testing.assert_allclose(ranking.scores, np.array(batch16_scores[:6])[order], atol=1e-5)
    latent = {"samples": torch.arange(6.0).view(6, 1, 1, 1).expand(6, 4, 6, 5).clone()}
    ranked = reorder_latent(latent, ranking.order, 6)
    assert ranked["samples"][:, 0, 0, 0].tolist() == order.tolist()
    assert ranked["batch_index"] == order.tolist()  # a KSampler with the same seed regenerates each one's noise
    twice = reorder_latent(ranked, torch.tensor([1, 0, 2, 3, 4, 5]), 6)
    assert twice["batch_index"][:2] == [order[1], order[0]]  # indices of the original batch, not of the sorted one
    report = ranking.report(seed=42)
    assert report.splitlines()[0] == f"#1: seed 42, batch index {order[0]}, score {ranking.scores[0]:.3f}"
    assert report.count("\n") == 1


def test_rank_keeps_masks_with_their_images(batch16):
    mask = torch.arange(6.0).view(6, 1, 1).expand(6, 48, 40).clone()
    order = torch.tensor([3, 1, 0, 2, 5, 4])
    assert reorder_mask(mask, order, 6)[:, 0, 0].tolist() == order.tolist()
    assert reorder_mask(mask[:1], order, 6) is not None  # one mask for the whole batch stays as it is
    with pytest.raises(ValueError, match="mask batch has 2 masks but the images 6"):
        reorder_mask(mask[:2], order, 6)
    with pytest.raises(ValueError, match="latent batch has 2 items but the images 6"):
        reorder_latent({"samples": torch.zeros(2, 4, 6, 5)}, order, 6)


def test_filter_keeps_images_at_or_above_the_threshold():
    keep, report = filter_mask([5.0, 7.5, 6.0, 2.0], 6.0)
    assert keep.tolist() == [False, True, True, False] and report == "2 of 4 images reached 6: [1, 2]."
    keep, report = filter_mask([5.0, 2.0], 6.0)
    assert not keep.any() and report == "None of the 2 images reached 6 (best 5.000); nothing passed."


@pytest.mark.parametrize(("preset", "threshold", "ok"), [("artquant", 1.0, True), ("artquant", 10.0, True),
                                                          ("artquant", 0.5, False), ("deqa-score", 6.0, False),
                                                          ("qrealign-mini-quality", 0.0, True),
                                                          ("qrealign-pro-aesthetics", 1.0, True),
                                                          ("qrealign-mini-quality", 6.0, False),
                                                          ("qrealign-lite-quality", -0.01, False)])
def test_threshold_must_lie_in_the_presets_score_range(preset, threshold, ok):
    if ok:
        check_threshold(threshold, PRESETS[preset])
    else:
        with pytest.raises(ValueError, match=f"outside the {preset} preset's score range"):
            check_threshold(threshold, PRESETS[preset])


def test_overlay_draws_in_the_corner_only(handle, batch16):
    drawn = overlay_scores(handle, batch16[:2])
    assert drawn.shape == (2, 48, 40, 3)
    assert not torch.allclose(drawn[:, :6, :6], batch16[:2, :6, :6])
    torch.testing.assert_close(drawn[:, -8:, -8:], (batch16[:2, -8:, -8:] * 255).round() / 255)


def test_describe_gives_a_paragraph_per_image(handle, batch16):
    text = describe_images(handle, batch16[:2], max_new_tokens=4)
    assert text.startswith("Image 0: ") and "\n\nImage 1: " in text


def test_describe_stops_between_tokens_when_cancelled(handle, batch16):
    calls = []

    def cancel_after_two_tokens():
        calls.append(1)
        if len(calls) == 2:
            raise InterruptedError("cancelled")

    with pytest.raises(InterruptedError):
        describe_images(handle, batch16[:1], max_new_tokens=50, check_cancel=cancel_after_two_tokens)
    assert len(calls) == 2


NAN_SECOND = torch.full((3, 8, 8, 3), 0.5).index_fill_(0, torch.tensor([1, 2]), float("nan"))


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.zeros(0, 8, 8, 3), "batch is empty"),
        (NAN_SECOND, r"2 of 3 images cannot be scored: image 0\[1\]: .*NaN.* image 0\[2\]: .*NaN.* Fix or remove"),
        (torch.rand(1, 8, 8, 1), "grey"),
        (torch.rand(1, 8, 8, 4), "4-channel"),
        (torch.rand(8, 8, 3), r"\[B, H, W, 3\]"),
        (torch.full((1, 8, 8, 3), 2.0), r"must be in \[0, 1\]"),
        (torch.zeros(4, 8, 8, 3, dtype=torch.int64), "holds floats in \\[0, 1\\], got torch.int64"),
        (torch.zeros(2, 8, 8, 3, device="meta"), "meta device"),
    ],
)
def test_bad_images_raise_naming_every_bad_image_on_every_node_path(handle, images, message):
    paths = (
        lambda: check_images(images),
        lambda: score_images(handle, images),
        lambda: rank_batch(handle, images, 1),
        lambda: overlay_scores(handle, images),
        lambda: describe_images(handle, images, max_new_tokens=2),  # raises like the others (no text in its place)
    )
    for path in paths:
        with pytest.raises(ValueError, match=message):
            path()


def test_an_image_qwen_vl_refuses_is_named_on_every_node_path(qrealign_handle):
    thin = torch.rand(2, 2, 500, 3, generator=torch.Generator().manual_seed(0))  # 250 times wider than high
    refused = "the image is 500 x 2, more than 200 times longer than wide, which Qwen-VL models do not take: crop it"
    for path in (lambda: score_images(qrealign_handle, thin), lambda: rank_batch(qrealign_handle, thin, 1),
                 lambda: overlay_scores(qrealign_handle, thin)):
        with pytest.raises(ValueError, match=f"The scorer failed on image 0: .*{refused}.* image 1: .*Fix those images"):
            path()
    with pytest.raises(ValueError, match=f"image 0 cannot be described: .*{refused}"):
        describe_images(qrealign_handle, thin, max_new_tokens=2)


# ------------------------------------------------------------------------------------------------------------------
# Reward guidance (the step the ArtQuant Guidance node runs at each guided sampler step)
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("sigma", "inside"), [(5.0, True), (10.0, True), (1.0, True), (10.5, False), (0.5, False)])
def test_the_window_is_between_its_start_and_end_sigmas(sigma, inside):
    assert guidance.in_window(sigma, sigma_start=10.0, sigma_end=1.0) is inside


def brightness(images: torch.Tensor) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


def test_a_guided_step_moves_each_prediction_up_the_reward_by_scale_times_its_rms():
    denoised = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    decode = torch.nn.Conv2d(4, 3, 1)
    step = guidance.RewardGuidance(decode=lambda z: torch.sigmoid(decode(z)), reward=brightness, scale=0.1, chunk=3)
    moved = step(denoised)
    with torch.no_grad():
        before, after = brightness(torch.sigmoid(decode(denoised))), brightness(torch.sigmoid(decode(moved)))
    assert (after > before).all()
    change = guidance.per_image_rms(moved - denoised).flatten()
    torch.testing.assert_close(change, 0.1 * guidance.per_image_rms(denoised).flatten(), rtol=1e-4, atol=0)
    one_at_a_time = guidance.RewardGuidance(decode=lambda z: torch.sigmoid(decode(z)), reward=brightness, scale=0.1, chunk=1)
    torch.testing.assert_close(one_at_a_time(denoised), moved, rtol=1e-5, atol=1e-6)  # chunking changes only memory


def test_guidance_differentiates_weights_made_in_inference_mode_and_puts_them_back():
    with torch.inference_mode():  # as ComfyUI executes nodes, and so loads and moves models
        decode = torch.nn.Conv2d(4, 3, 1)
        denoised = torch.randn(2, 4, 8, 8)
        original = decode.weight
        step = guidance.RewardGuidance(lambda z: torch.sigmoid(decode(z)), brightness, 0.1, chunk=2, modules=(decode,))
        moved = step(denoised)
    assert not torch.equal(moved, denoised)
    assert decode.weight is original and decode.weight.is_inference()


# A step length in the first-order range of each tiny random model: the tiny Q-ReAlign's score is so curved (a step of
# 1e-3 along its gradient already changes it 1.7 times as much as the gradient predicts) that longer steps overshoot.
GUIDANCE_SCALES = {"artquant": 0.2, "qrealign-mini-quality": 1e-4}


def test_guidance_through_the_real_scorer_raises_the_score(scorer):
    projection = torch.nn.Conv2d(4, 3, 1)
    seeded = torch.Generator().manual_seed(0)
    torch.nn.init.normal_(projection.weight, std=0.5, generator=seeded)
    torch.nn.init.normal_(projection.bias, std=0.5, generator=seeded)

    def decode(latent):  # a stand-in VAE: 4-channel latents at 1/8 size -> RGB in [0, 1]
        return torch.sigmoid(torch.nn.functional.interpolate(projection(latent), scale_factor=8, mode="bilinear"))

    def reward(images):
        return scorer.score_tensor(images).scores

    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    moved = guidance.RewardGuidance(decode, reward, scale=GUIDANCE_SCALES[scorer.preset.name], chunk=2)(latent)
    with torch.no_grad():
        assert (reward(decode(moved)) > reward(decode(latent))).all()


# ------------------------------------------------------------------------------------------------------------------
# Example workflows (run in a real ComfyUI by test_comfy_integration.py; their layout is checked here)
# ------------------------------------------------------------------------------------------------------------------
EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "example_workflows").glob("*.json"))
TITLE_HEIGHT = 30  # LiteGraph draws a node's title bar above its `pos`


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_workflow_nodes_do_not_overlap_and_links_match_their_slots(path):
    workflow = json.loads(path.read_text())
    boxes = {n["id"]: (n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in workflow["nodes"]}
    for a, b in itertools.combinations(boxes, 2):
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes[a], boxes[b]
        assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, f"nodes {a} and {b} overlap in {path.name}"
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for link_id, source, source_slot, target, target_slot, kind in workflow["links"]:
        assert link_id in nodes[source]["outputs"][source_slot]["links"]
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        assert nodes[source]["outputs"][source_slot]["type"] == kind
    assert all(n.get("title") for n in workflow["nodes"]), "every node has a readable title"
    assert path.with_suffix(".jpg").is_file(), "ComfyUI's template browser shows <name>.jpg as the thumbnail"
