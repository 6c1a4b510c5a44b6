"""The reward functions: ddpo-pytorch contract, input forms, normalisation, bad input, and the differentiable reward,
on the ArtQuant fixture (mPLUG-Owl2) and on the tiny Q-ReAlign checkpoint (Qwen3.5-VL)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from artquant.reward import ArtQuantReward, artquant_reward
from PIL import Image
from reward_tiny_pipelines import SCORE_RANGES, score_range, tiny_qrealign_scorer

pytestmark = pytest.mark.usefixtures("one_thread")


def private_copy(scorer):
    """The scorer with its own model: rewards freeze the model in place, which must not leak into shared fixtures."""
    clone = copy.copy(scorer)
    clone.model = copy.deepcopy(scorer.model)
    return clone


@pytest.fixture(scope="module")
def artquant_scorer(lora_scorer):
    return private_copy(lora_scorer)


@pytest.fixture(scope="module")
def qrealign_scorer_copy():
    return tiny_qrealign_scorer()


@pytest.fixture(scope="module", params=list(SCORE_RANGES))
def scorer(request):
    """Each family's scorer in turn (the ArtQuant one skips without the reference fixture, the Q-ReAlign one never)."""
    return request.getfixturevalue("artquant_scorer" if request.param == "artquant" else "qrealign_scorer_copy")


def fresh_scorer(request, family: str):
    """A scorer of `family` that no reward has touched yet (rewards switch checkpointing on in place)."""
    return private_copy(request.getfixturevalue("lora_scorer")) if family == "artquant" else tiny_qrealign_scorer()


@pytest.fixture(scope="module")
def uint8_batch() -> np.ndarray:
    """Three random RGB images [3, 37, 52, 3] (NHWC uint8), non-square so that padding is exercised."""
    return np.random.default_rng(0).integers(0, 256, size=(3, 37, 52, 3), dtype=np.uint8)


def test_rewards_equal_the_reference_scores(artquant_scorer, reference_images, golden):
    reward_fn = artquant_reward(artquant_scorer)
    images = [Image.open(path) for path in reference_images]
    rewards, info = reward_fn(images, ["a prompt"] * len(images), [{}] * len(images))
    assert rewards.shape == (len(images),)
    torch.testing.assert_close(rewards, torch.tensor(golden["lora_scores"]), atol=1e-4, rtol=0)
    torch.testing.assert_close(info["level_probs"], torch.tensor(golden["lora_level_probs"]), atol=1e-4, rtol=0)
    weights = torch.tensor(golden["score_weight"])
    expected_std = (info["level_probs"] * (weights - rewards[:, None]) ** 2).sum(1).sqrt()
    torch.testing.assert_close(info["std"], expected_std, atol=1e-4, rtol=0)
    assert info["level_names"] == golden["level_names"] and info["errors"] == [None] * len(images)


@pytest.mark.parametrize("task", ["quality", "aesthetics"])
def test_qrealign_rewards_equal_the_authors_scores(qrealign_dir, qrealign_images, qrealign_golden, task):
    """The reward factory builds the Q-ReAlign scorer from a preset name; its rewards are the authors' scores."""
    reward_fn = artquant_reward(model=qrealign_dir, preset=f"qrealign-mini-{task}", device="cpu", dtype="fp32")
    rewards, info = reward_fn([Image.open(path) for path in qrealign_images], None, None)
    expected = torch.tensor([qrealign_golden["scores"][task][path.name] for path in qrealign_images])
    torch.testing.assert_close(rewards, expected, atol=1e-4, rtol=0)
    weights = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])  # excellent .. bad, as pyiqa's qrealign_arch.py weighs them
    torch.testing.assert_close((info["level_probs"] * weights).sum(1), rewards, atol=1e-5, rtol=0)
    assert info["level_names"] == ["excellent", "good", "fair", "poor", "bad"]


def test_rewards_equal_scorer_score_on_the_same_images(scorer, uint8_batch):
    rewards, info = ArtQuantReward(scorer)(torch.from_numpy(uint8_batch).permute(0, 3, 1, 2).float() / 255)
    direct = scorer.score(list(uint8_batch))
    assert rewards.tolist() == pytest.approx([r.score for r in direct], abs=1e-6)
    assert info["std"].tolist() == pytest.approx([r.std for r in direct], abs=1e-6)


def test_every_input_form_gives_the_same_rewards(scorer, uint8_batch):
    nchw_uint8 = torch.from_numpy(uint8_batch).permute(0, 3, 1, 2)
    unit = nchw_uint8.double() / 255
    forms = {
        "NCHW float [0, 1]": (unit.float(), {}),
        "NCHW float64 [0, 1]": (unit, {}),
        "NCHW float [-1, 1]": ((unit * 2 - 1).float(), {"value_range": (-1, 1)}),
        "NCHW uint8": (nchw_uint8, {}),
        "NHWC uint8 numpy": (uint8_batch, {}),
        "NHWC float numpy": (uint8_batch.astype(np.float32) / 255, {}),
        "NHWC torch, layout given": (torch.from_numpy(uint8_batch), {"layout": "NHWC"}),
        "list of PIL": ([Image.fromarray(image) for image in uint8_batch], {}),
    }
    expected = torch.tensor([r.score for r in scorer.score(list(uint8_batch))])
    for name, (images, options) in forms.items():
        layout = options.pop("layout", None)
        rewards, _ = ArtQuantReward(scorer, **options)(images, None, None, layout=layout)
        torch.testing.assert_close(rewards, expected, atol=1e-6, rtol=0, msg=name)


def test_normalisations(scorer, uint8_batch):
    images = torch.from_numpy(uint8_batch).permute(0, 3, 1, 2)
    raw, _ = ArtQuantReward(scorer, normalize="raw")(images)
    unit, _ = ArtQuantReward(scorer, normalize="unit")(images)
    low, high = score_range(scorer)
    torch.testing.assert_close(unit, (raw - low) / (high - low))
    assert (unit >= 0).all() and (unit <= 1).all()

    zscore = ArtQuantReward(scorer, normalize="zscore")
    zscore(images[:2], update_stats=True)
    second, info = zscore(images, update_stats=True)
    seen = np.concatenate([raw[:2].numpy(), raw.numpy()]).astype(np.float64)
    expected = (raw.numpy() - seen.mean()) / seen.std()
    # The rewards are float32: a score's rounding (< 1e-6) is divided by the std (~0.01 on the tiny Q-ReAlign model).
    rounding = 1e-6 / seen.std()
    np.testing.assert_allclose(second.numpy(), expected, rtol=1e-5, atol=rounding)
    torch.testing.assert_close(info["score"], raw)  # the raw score stays available

    # Evaluation and gradient calls normalise with the statistics as they are and never move them.
    count, mean, std = zscore.moments.count, zscore.moments.mean, zscore.moments.std
    evaluation, _ = zscore(images[:1])
    with torch.no_grad():
        zscore.differentiable(images[:1].float() / 255)
    assert (zscore.moments.count, zscore.moments.mean, zscore.moments.std) == (count, mean, std)
    np.testing.assert_allclose(evaluation.numpy(), (raw[:1].numpy() - mean) / std, rtol=1e-5, atol=rounding)


@pytest.mark.parametrize(
    ("images", "options", "message"),
    [
        (torch.rand(2, 20, 20, 3), {}, "NHWC"),
        (torch.rand(3, 20, 20), {}, "batch"),
        (torch.rand(2, 4, 20, 20), {}, "3 channels"),
        (torch.rand(2, 3, 20, 20) * 2 - 1, {}, "value_range=(-1, 1)"),
        (torch.rand(2, 3, 20, 20) * 255, {}, "uint8"),
        (torch.rand(2, 3, 20, 20), {"value_range": (0, 255)}, "value_range"),
        (Image.new("RGB", (20, 20)), {}, "list of PIL"),
        ("image.png", {}, "torch tensor"),
    ],
)
def test_bad_batches_raise_clear_errors(scorer, images, options, message):
    with pytest.raises(ValueError, match=message if message != "value_range=(-1, 1)" else r"value_range=\(-1, 1\)"):
        ArtQuantReward(scorer, **options)(images)


def test_a_nan_image_is_named_or_costs_only_its_own_reward(scorer, uint8_batch):
    images = torch.from_numpy(uint8_batch).permute(0, 3, 1, 2).float() / 255
    clean, _ = ArtQuantReward(scorer)(images)
    images[1, 0, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="image 1"):
        ArtQuantReward(scorer)(images)
    rewards, info = ArtQuantReward(scorer, errors="nan")(images)
    assert torch.isnan(rewards[1]) and "NaN" in info["errors"][1]
    torch.testing.assert_close(rewards[[0, 2]], clean[[0, 2]])
    lowest = score_range(scorer)[0]
    for options, stated in [({}, lowest), ({"normalize": "unit"}, 0.0), ({"fallback": -3.0}, -3.0)]:
        rewards, info = ArtQuantReward(scorer, errors="fallback", **options)(images)
        assert rewards[1] == stated and "NaN" in info["errors"][1]
        assert info["errors"][0] is None and torch.isfinite(rewards).all()


# ----------------------------------------------------------------------------------------------------------------
# Differentiable reward
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=list(SCORE_RANGES))
def float64_reward(request):
    scorer = fresh_scorer(request, request.param)
    scorer.model.double()
    scorer.dtype = torch.float64
    return ArtQuantReward(scorer)


def test_differentiable_reward_is_the_score_of_the_same_pixels(scorer, uint8_batch):
    reward = ArtQuantReward(scorer, normalize="unit")
    if scorer.preset.family == "mplug_owl2":
        # The float path skips PIL's 8-bit rounding between the resize passes; nothing else differs.
        images, tolerance = torch.from_numpy(uint8_batch).permute(0, 3, 1, 2).float() / 255, 2e-4
    else:
        # Q-ReAlign takes 32 x 64 as it is (multiples of 32 within its pixel budget): only float rounding differs.
        uint8 = torch.randint(0, 256, (3, 3, 32, 64), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
        images, tolerance = uint8.float() / 255, 1e-5
    with torch.no_grad():
        differentiable = reward.differentiable(images * 2 - 1, value_range=(-1, 1))
    plain, _ = reward(images)
    torch.testing.assert_close(differentiable, plain, atol=tolerance, rtol=0)


def test_gradients_match_finite_differences(float64_reward):
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(2, 3, 24, 40, generator=generator, dtype=torch.float64) * 0.8 + 0.1).requires_grad_(True)
    float64_reward.differentiable(images).sum().backward()
    gradient = images.grad

    def directional_difference(direction, step=1e-3):
        with torch.no_grad():
            upper = float64_reward.differentiable(images + step * direction).sum()
            lower = float64_reward.differentiable(images - step * direction).sum()
        return float(upper - lower) / (2 * step)

    # float32 steps inside the model (LlamaRMSNorm, the scorer's logits) leave ~1e-7 of noise in the score, so the
    # steps are large enough to rise above it: one random direction over every pixel, directions confined to single
    # 8 x 8 regions of one channel, and single pixels (corners included: they sit next to the padding).
    direction = torch.randn(images.shape, generator=generator, dtype=torch.float64)
    assert directional_difference(direction) == pytest.approx(float((gradient * direction).sum()), rel=2e-3)
    for image, channel, top, left in [(0, 0, 0, 0), (0, 2, 16, 32), (1, 1, 8, 16)]:
        local = torch.zeros_like(images)
        local[image, channel, top : top + 8, left : left + 8] = torch.randn(
            8, 8, generator=generator, dtype=torch.float64
        )
        analytic = float((gradient * local).sum())
        assert directional_difference(local) == pytest.approx(analytic, rel=2e-2, abs=2e-4)
    for pixel in [(0, 0, 0, 0), (0, 2, 23, 39), (1, 1, 5, 7), (1, 0, 12, 20)]:
        one_hot = torch.zeros_like(images)
        one_hot[pixel] = 1.0
        assert directional_difference(one_hot, step=1e-2) == pytest.approx(float(gradient[pixel]), rel=5e-2, abs=2e-5)


def test_every_pixel_region_gets_gradient(float64_reward):
    images = torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    images.requires_grad_(True)
    float64_reward.differentiable(images).sum().backward()
    per_region = images.grad.abs().unfold(2, 4, 4).unfold(3, 4, 4).sum((-1, -2))  # [1, 3, 6, 10] blocks of 4 x 4
    assert (per_region > 0).all()


def test_scorer_is_frozen_and_gradients_reach_only_pixels(scorer):
    reward = ArtQuantReward(scorer)
    images = torch.rand(2, 3, 30, 30, requires_grad=True)
    (-reward.differentiable(images).mean()).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in scorer.model.parameters())


def _saved_activation_bytes(reward, images):
    """Bytes autograd keeps for the backward pass, weights excluded."""
    weights = {p.data_ptr() for p in reward.scorer.model.parameters()}
    saved = []

    def pack(tensor):
        if tensor.data_ptr() not in weights:
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        rewards = reward.differentiable(images)
    return sum(saved), rewards


@pytest.mark.parametrize("family", list(SCORE_RANGES))
def test_gradient_checkpointing_saves_less_and_gives_the_same_gradients(request, family):
    images = torch.rand(2, 3, 30, 30, generator=torch.Generator().manual_seed(2))
    results = {}
    for checkpointing in (True, False):
        pixels = images.clone().requires_grad_(True)
        reward = ArtQuantReward(fresh_scorer(request, family), gradient_checkpointing=checkpointing)
        saved, rewards = _saved_activation_bytes(reward, pixels)
        rewards.sum().backward()
        results[checkpointing] = saved, pixels.grad
    assert results[True][0] < 0.6 * results[False][0]  # 0.45 with the fixture: the layers keep only their inputs
    torch.testing.assert_close(results[True][1], results[False][1], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.randint(0, 255, (1, 3, 20, 20), dtype=torch.uint8), "float torch images"),
        (torch.full((1, 3, 20, 20), float("nan")), "NaN"),
        (torch.rand(1, 3, 20, 20) * 3 - 1.5, "clamp"),
    ],
)
def test_differentiable_rejects_bad_input(scorer, images, message):
    with pytest.raises(ValueError, match=message):
        ArtQuantReward(scorer).differentiable(images, value_range=(-1, 1))


@pytest.mark.parametrize("family", list(SCORE_RANGES))
def test_gradient_checkpointing_refuses_a_scorer_with_active_dropout(request, family):
    """Checkpointing runs the scorer in training mode, where dropout would make rewards random. Q-ReAlign's dropout
    rate sits in a nested text config, which only its attention layers carry as `attention_dropout`."""
    scorer = fresh_scorer(request, family)
    ArtQuantReward(scorer).differentiable(torch.rand(1, 3, 32, 32))  # none by default: accepted
    scorer = fresh_scorer(request, family)
    attention = next(m for m in scorer.model.modules() if isinstance(getattr(m, "attention_dropout", None), float))
    attention.attention_dropout = 0.1
    with pytest.raises(ValueError, match="active dropout; pass gradient_checkpointing=False"):
        ArtQuantReward(scorer).differentiable(torch.rand(1, 3, 32, 32))
    rewards = ArtQuantReward(scorer, gradient_checkpointing=False).differentiable(torch.rand(1, 3, 32, 32))
    assert torch.isfinite(rewards).all()
