"""The RL-trainer adapters, each driven by the calling lines of the trainer it serves (written here from reading
ddpo-pytorch, flow_grpo, Flow-Factory and trl; none of their code is imported), plus the bad-input table of every
reward entry point and the per-thread device rule. Each runs on the ArtQuant fixture (mPLUG-Owl2) and on the tiny
Q-ReAlign checkpoint (Qwen3.5-VL)."""

from __future__ import annotations

import concurrent.futures
import inspect
import io
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from artquant import ArtQuantScorer, CheckpointError
from artquant.reward import (
    ArtQuantReward,
    FlowFactoryReward,
    alignprop_reward,
    artquant_reward,
    async_reward,
    flow_grpo_reward,
    flow_grpo_score,
)
from artquant.reward import functions as reward_functions
from PIL import Image
from reward_tiny_pipelines import (
    QREALIGN_PRESET,
    QREALIGN_TINY,
    SCORE_RANGES,
    fresh_scorer,
    score_range,
    tiny_qrealign_scorer,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=list(SCORE_RANGES))
def scorer(request):
    return fresh_scorer(request.param, request)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """What the trainers pass: a pipeline's output_type="pt" batch [4, 3, 24, 24] in [0, 1]."""
    return torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def expected(scorer, images) -> torch.Tensor:
    """The scores of the same pixels read as 8-bit images, straight from the scorer."""
    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return torch.tensor([r.score for r in scorer.score(list(pixels))])


PROMPTS = ("a cat", "a dog", "a house", "the sea")
METADATA = ({},) * 4


def test_ddpo_pytorch_calls_the_reward_from_its_executor(scorer, images, expected):
    reward_fn = artquant_reward(scorer)
    # ddpo-pytorch scripts/train.py: submitted to a thread pool, then `.result()`; rewards go through as_tensor.
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    rewards = executor.submit(reward_fn, images, PROMPTS, METADATA)
    time.sleep(0)
    rewards, reward_metadata = rewards.result()
    rewards = torch.as_tensor(rewards, device="cpu")
    torch.testing.assert_close(rewards, expected, atol=1e-5, rtol=0)
    assert reward_metadata["errors"] == [None] * 4


def test_flow_grpo_multi_score_registry(scorer, images, expected, monkeypatch):
    monkeypatch.setattr(ArtQuantScorer, "from_pretrained", classmethod(lambda cls, **kwargs: scorer))
    # flow_grpo/rewards.py multi_score: the registry entry is built with the device when it takes one ...
    score_functions = {"artquant": flow_grpo_score}
    score_dict = {"artquant": 0.5}
    score_fns = {}
    for score_name, weight in score_dict.items():
        score_fns[score_name] = (
            score_functions[score_name]("cpu")
            if "device" in score_functions[score_name].__code__.co_varnames
            else score_functions[score_name]()
        )
    # ... and called per batch; the weighted scores are summed into 'avg'.
    total_scores, score_details = [], {}
    for score_name, weight in score_dict.items():
        scores, rewards = score_fns[score_name](images, PROMPTS, METADATA)
        score_details[score_name] = scores
        weighted_scores = [weight * score for score in scores]
        total_scores = weighted_scores if not total_scores else [t + w for t, w in zip(total_scores, weighted_scores)]
    score_details["avg"] = total_scores
    # scripts/train_sd3.py: every entry becomes a float tensor on the device.
    gathered = {key: torch.as_tensor(value, device="cpu").float() for key, value in score_details.items()}
    torch.testing.assert_close(gathered["artquant"], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(gathered["avg"], 0.5 * expected, atol=1e-5, rtol=0)


def test_flow_grpo_reward_in_place_of_multi_score(scorer, images, expected):
    reward_fn = flow_grpo_reward("cpu", scorer=scorer, normalize="zscore")
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=8)
    # scripts/train_sd3.py, sampling: only_strict=True, then the dict of per-key scores.
    rewards = executor.submit(reward_fn, images, PROMPTS, METADATA, only_strict=True)
    time.sleep(0)
    rewards, reward_metadata = rewards.result()
    rewards = {key: torch.as_tensor(value, device="cpu").float() for key, value in rewards.items()}
    assert set(rewards) == {"artquant", "avg"} and rewards["avg"].shape == (4,)
    mean, std = expected.double().mean(), expected.double().std(unbiased=False)
    torch.testing.assert_close(rewards["avg"].double(), (expected.double() - mean) / std, atol=1e-4, rtol=0)
    # eval: only_strict=False leaves the statistics alone.
    before, _ = executor.submit(reward_fn, images, PROMPTS, METADATA, only_strict=False).result()
    after, _ = executor.submit(reward_fn, images, PROMPTS, METADATA, only_strict=False).result()
    np.testing.assert_array_equal(before["avg"], after["avg"])
    assert reward_metadata["artquant_errors"] == [None] * 4


def test_a_nan_image_gets_the_fallback_and_its_group_keeps_finite_advantages(scorer, images, expected):
    broken = images.clone()
    broken[2, 1, 5, 5] = float("nan")  # as an fp16 VAE overflow leaves it
    reward_fn = flow_grpo_reward("cpu", scorer=scorer)
    rewards, metadata = reward_fn(broken, PROMPTS, METADATA, only_strict=True)
    assert rewards["avg"][2] == score_range(scorer)[0] and "NaN" in metadata["artquant_errors"][2]  # the lowest score
    np.testing.assert_allclose(np.delete(rewards["avg"], 2), np.delete(expected.numpy(), 2), atol=1e-5)
    # flow_grpo's group advantage: (r - mean) / (std + 1e-4), finite for everyone.
    group = torch.as_tensor(rewards["avg"])
    advantages = (group - group.mean()) / (group.std() + 1e-4)
    assert torch.isfinite(advantages).all()


def test_flow_factory_builds_and_calls_the_pointwise_model(scorer, images, expected, monkeypatch):
    monkeypatch.setattr(ArtQuantScorer, "from_pretrained", classmethod(lambda cls, **kwargs: scorer))
    # Flow-Factory: RewardArguments (device "cuda" means the accelerator's), the class from its python path.
    config = SimpleNamespace(
        name="artquant", reward_model="artquant.reward.FlowFactoryReward", weight=1.0, dtype=torch.float32,
        device=torch.device("cpu"), batch_size=2, extra_kwargs={"normalize": "unit"},
    )  # fmt: skip
    accelerator = SimpleNamespace(device=torch.device("cpu"))
    model = FlowFactoryReward(config, accelerator)
    pil_images = [Image.fromarray(a) for a in (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()]
    # reward_processor: keyword fields filtered by the __call__ signature, then rewards as a CPU float tensor.
    batch_input = {"prompt": list(PROMPTS), "image": pil_images, "video": None, "latents": torch.zeros(1)}
    signature = inspect.signature(model.__call__)
    if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        batch_input = {k: v for k, v in batch_input.items() if k in set(signature.parameters.keys())}
    output = model(**batch_input)
    rewards = torch.as_tensor(output.rewards if hasattr(output, "rewards") else output, device="cpu", dtype=torch.float32)
    low, high = score_range(scorer)
    torch.testing.assert_close(rewards, (expected - low) / (high - low), atol=1e-5, rtol=0)
    assert output.extra_info["errors"] == [None] * 4 and model.required_fields == ("image", "prompt")


def test_flow_factory_to_moves_the_whole_scorer():
    """Flow-Factory moves a reward with `.to(device)`: the scorer's token ids must follow its weights (onto the meta
    device here, where anything left behind would show)."""
    model = FlowFactoryReward(SimpleNamespace(device="cpu"), None, scorer=tiny_qrealign_scorer()).to("meta")
    scorer = model.reward.scorer
    assert scorer.device.type == scorer.prompt_ids.device.type == scorer.level_ids.device.type == "meta"
    assert {p.device.type for p in scorer.model.parameters()} == {"meta"}


def test_trl_async_reward_returns_futures(scorer, images, expected):
    reward_fn = async_reward(ArtQuantReward(scorer))
    prompt_image_pairs = [(images[:2], PROMPTS[:2], METADATA[:2]), (images[2:], PROMPTS[2:], METADATA[2:])]
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    # trl DDPOTrainer.compute_rewards(is_async=True)
    rewards = executor.map(lambda x: reward_fn(*x), prompt_image_pairs)
    rewards = [
        (torch.as_tensor(reward.result(), device="cpu"), reward_metadata.result())
        for reward, reward_metadata in rewards
    ]
    rewards, rewards_metadata = zip(*rewards)
    torch.testing.assert_close(torch.cat(rewards), expected, atol=1e-5, rtol=0)


def test_trl_async_reward_passes_errors_through_its_futures(scorer):
    reward_fn = async_reward(ArtQuantReward(scorer))
    reward, metadata = reward_fn("not images", PROMPTS, METADATA)
    with pytest.raises(ValueError, match="torch tensor"):
        reward.result()
    with pytest.raises(ValueError, match="torch tensor"):
        metadata.result()


def test_alignprop_loss_backpropagates_to_the_images(scorer, images, expected):
    reward_function = alignprop_reward(ArtQuantReward(scorer))
    pixels = images.clone().requires_grad_(True)
    # trl AlignPropTrainer: compute_rewards -> calculate_loss -> backward.
    rewards, reward_metadata = reward_function(pixels, PROMPTS, METADATA)
    rewards_vis = rewards.detach().cpu().numpy()
    loss = 10.0 - rewards.mean()
    loss.backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    # The float path skips the 8-bit rounding of the plain reward: equal within that rounding.
    np.testing.assert_allclose(rewards_vis, expected.numpy(), atol=5e-3)


# ----------------------------------------------------------------------------------------------------------------
# Per-thread device
# ----------------------------------------------------------------------------------------------------------------
def test_every_call_runs_with_the_scorers_device_current_in_the_calling_thread(scorer, images, monkeypatch):
    entered: list[tuple[str, str]] = []

    class RecordingScope:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            import threading

            entered.append((str(self.device), threading.current_thread().name))

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(reward_functions, "device_scope", RecordingScope)
    reward = ArtQuantReward(scorer)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainer") as executor:
        executor.submit(reward, images, PROMPTS, METADATA).result()
        executor.submit(reward.differentiable, images).result()
    assert entered == [("cpu", "trainer_0"), ("cpu", "trainer_0")]


def test_plain_cuda_resolves_to_the_building_threads_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert reward_functions.resolve_device("cuda") == torch.device("cuda", 3)
    assert reward_functions.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert reward_functions.resolve_device("cpu") == torch.device("cpu")
    assert reward_functions.resolve_device(None) is None


# ----------------------------------------------------------------------------------------------------------------
# Bad input, per entry point: one bad image never costs the others their rewards
# ----------------------------------------------------------------------------------------------------------------
def _bad_batch(kind: str, good: torch.Tensor):
    """`good` (4 images) with image 1 broken in the way `kind` says, in the form a trainer would pass."""
    pixels = (good * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    pils = [Image.fromarray(a) for a in pixels]
    if kind == "NaN pixels":
        batch = good.clone()
        batch[1] = float("nan")
        return batch
    if kind == "infinite pixels":
        batch = good.clone()
        batch[1, 0, 0, 0] = float("inf")
        return batch
    if kind == "closed PIL image":
        pils[1].close()
        return pils
    if kind == "PIL mode that cannot convert":
        pils[1] = Image.new("La", (24, 24))  # PIL has no conversion from La to RGB
        return pils
    if kind == "PNG that fails on load()":
        buffer = io.BytesIO()
        pils[1].save(buffer, format="PNG")
        pils[1] = Image.open(io.BytesIO(buffer.getvalue()[:60]))  # opens lazily from the header; pixels cut off
        return pils
    if kind == "object array with a string":
        items = np.empty(4, dtype=object)
        for index, array in enumerate(pixels):
            items[index] = array
        items[1] = "not an image"
        return items
    raise AssertionError(kind)


BAD_IMAGES = [
    "NaN pixels",
    "infinite pixels",
    "closed PIL image",
    "PIL mode that cannot convert",
    "PNG that fails on load()",
    "object array with a string",
]


@pytest.mark.parametrize("kind", BAD_IMAGES)
@pytest.mark.parametrize("entry", ["ArtQuantReward", "artquant_reward", "flow_grpo_score", "flow_grpo_reward", "FlowFactoryReward", "async_reward"])  # noqa: E501
def test_one_bad_image_costs_only_its_own_reward(scorer, images, expected, kind, entry):
    batch = _bad_batch(kind, images)
    fallback_options = {"errors": "fallback", "fallback": -1.0}
    if entry == "ArtQuantReward":
        rewards, info = ArtQuantReward(scorer, **fallback_options)(batch)
        errors = info["errors"]
    elif entry == "artquant_reward":
        rewards, info = artquant_reward(scorer, **fallback_options)(batch, PROMPTS, METADATA)
        errors = info["errors"]
    elif entry == "flow_grpo_score":
        rewards, info = flow_grpo_score("cpu", scorer=scorer, fallback=-1.0)(batch, PROMPTS, METADATA)
        errors = info["artquant_errors"]
    elif entry == "flow_grpo_reward":
        scores, info = flow_grpo_reward("cpu", scorer=scorer, fallback=-1.0)(batch, PROMPTS, METADATA)
        rewards, errors = scores["avg"], info["artquant_errors"]
    elif entry == "FlowFactoryReward":
        config = SimpleNamespace(device="cpu", batch_size=2, extra_kwargs={"fallback": -1.0})
        as_list = list(batch) if not isinstance(batch, list) else batch
        output = FlowFactoryReward(config, None, scorer=scorer)(list(PROMPTS), as_list)
        rewards, errors = output.rewards, output.extra_info["errors"]
    else:
        reward, info = async_reward(ArtQuantReward(scorer, **fallback_options))(batch, PROMPTS, METADATA)
        rewards, errors = reward.result(), info.result()["errors"]
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    assert rewards.shape == (4,) and rewards[1] == -1.0
    assert errors[1] and all(error is None for index, error in enumerate(errors) if index != 1)
    torch.testing.assert_close(rewards[[0, 2, 3]], expected[[0, 2, 3]], atol=1e-5, rtol=0)


@pytest.mark.parametrize("errors", ["nan", "fallback"])
def test_differentiable_keeps_the_others_gradients_when_one_image_is_nan(scorer, images, errors):
    pixels = images.clone()
    pixels[1, 2, 3, 3] = float("nan")
    pixels.requires_grad_(True)
    rewards = ArtQuantReward(scorer, errors=errors).differentiable(pixels)
    assert torch.isnan(rewards[1]) if errors == "nan" else rewards[1] == score_range(scorer)[0]
    assert torch.isfinite(rewards[[0, 2, 3]]).all()
    rewards[[0, 2, 3]].sum().backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad[0].abs().sum() > 0 and pixels.grad[1].abs().sum() == 0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: ArtQuantReward(s, errors="ignore"), "errors must be one of"),
        (lambda s: ArtQuantReward(s, fallback=float("nan")), "fallback must be a finite number"),
        (lambda s: ArtQuantReward(s, batch_size=0), "batch_size must be a positive integer"),
        (lambda s: ArtQuantReward(s, normalize="minmax"), "normalize must be one of"),
        (lambda s: ArtQuantReward(s)(torch.rand(2, 3, 8, 8) * 2 - 1), r"value_range=\(-1, 1\)"),
        (lambda s: ArtQuantReward(s)(Image.new("RGB", (8, 8))), "list of PIL"),
        (lambda s: ArtQuantReward(s).differentiable(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)), "float torch images"),
        (lambda s: alignprop_reward(ArtQuantReward(s))(torch.rand(1, 3, 8, 8) * 3, None, None), "values in"),
        (lambda s: FlowFactoryReward(SimpleNamespace(device="cpu"), None, scorer=s)(["a"], None), "no `image`"),
        (lambda s: FlowFactoryReward(SimpleNamespace(device="cpu"), None, scorer=s)(["a", "b"], [Image.new("RGB", (8, 8))]), "one image per prompt"),  # noqa: E501
        (lambda s: flow_grpo_reward("cpu", scorer=s)(torch.rand(2, 8, 8), None, None), "batch"),
    ],
)
def test_bad_arguments_raise_clear_errors(scorer, call, message):
    with pytest.raises(ValueError, match=message):
        call(scorer)


def test_a_meta_tensor_batch_gives_one_error_per_image(scorer):
    rewards, info = ArtQuantReward(scorer, errors="fallback")(torch.empty(3, 3, 8, 8, device="meta"))
    assert rewards.tolist() == [score_range(scorer)[0]] * 3 and len(info["errors"]) == 3 and all(info["errors"])


def test_integer_and_bool_batches_give_one_result_per_image(scorer, images, expected):
    as_int64 = (images * 255).round().to(torch.int64)
    rewards, info = ArtQuantReward(scorer)(as_int64)
    torch.testing.assert_close(rewards, expected, atol=1e-5, rtol=0)
    rewards, info = ArtQuantReward(scorer, errors="nan")(torch.zeros(4, 3, 8, 8, dtype=torch.bool))
    assert rewards.shape == (4,) and all(info["errors"])


# ----------------------------------------------------------------------------------------------------------------
# Scorer loading through each reward entry point: a checkpoint of the other family, or arguments a preset cannot use
# ----------------------------------------------------------------------------------------------------------------
def _build(entry: str, **scorer_kwargs):
    scorer_kwargs = dict(scorer_kwargs, dtype=torch.float32)
    if entry == "artquant_reward":
        return artquant_reward(device="cpu", **scorer_kwargs)
    if entry == "flow_grpo_score":
        return flow_grpo_score("cpu", **scorer_kwargs)
    if entry == "flow_grpo_reward":
        return flow_grpo_reward("cpu", **scorer_kwargs)
    dtype = scorer_kwargs.pop("dtype")
    return FlowFactoryReward(SimpleNamespace(device="cpu", dtype=dtype, extra_kwargs=scorer_kwargs), None)


def _mplug_config_only(folder):
    (folder / "config.json").write_text('{"model_type": "mplug_owl2", "architectures": ["MPLUGOwl2LlamaForCausalLM"]}')
    return folder


LOADING_ERRORS = [
    ("Q-ReAlign preset on an mPLUG-Owl2 checkpoint",
     lambda tmp: dict(model=_mplug_config_only(tmp), preset=QREALIGN_PRESET),
     CheckpointError, "not a Qwen-VL model: pass a Q-ReAlign checkpoint"),
    ("ArtQuant preset on a Q-ReAlign checkpoint", lambda tmp: dict(model=QREALIGN_TINY, preset="artquant"),
     CheckpointError, "choose a qrealign-* preset"),
    ("Q-ReAlign preset with a base", lambda tmp: dict(model=QREALIGN_TINY, base=tmp, preset="qrealign-lite-aesthetics"),
     ValueError, "`base` is not used: leave it out"),
    ("unknown Q-ReAlign size", lambda tmp: dict(model=QREALIGN_TINY, preset="qrealign-huge-quality"),
     ValueError, "choose one of artquant"),
]  # fmt: skip


ENTRIES = ["artquant_reward", "flow_grpo_score", "flow_grpo_reward", "FlowFactoryReward"]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize(("case", "arguments", "error", "message"), LOADING_ERRORS, ids=[c[0] for c in LOADING_ERRORS])
def test_scorer_loading_errors_say_what_to_do(tmp_path, entry, case, arguments, error, message):
    with pytest.raises(error, match=message.replace("*", r"\*")):
        _build(entry, **arguments(tmp_path))


def _call(entry: str, built, images: torch.Tensor) -> torch.Tensor:
    """Rewards [B] from what `_build` made, called as its trainer calls it."""
    if entry == "FlowFactoryReward":
        pils = [Image.fromarray(a) for a in (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()]
        return built(list(PROMPTS), pils).rewards
    scores = built(images, PROMPTS, METADATA)[0]
    return torch.as_tensor(scores["avg"] if entry == "flow_grpo_reward" else scores)


@pytest.fixture(scope="module")
def qrealign_task_scores(images) -> dict[str, torch.Tensor]:
    """Each Q-ReAlign task's scores of the 8-bit `images`, straight from a scorer built for its preset."""
    pixels = list((images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return {
        preset: torch.tensor([r.score for r in ArtQuantScorer.from_pretrained(
            QREALIGN_TINY, preset=preset, device="cpu", dtype="fp32").score(pixels)])
        for preset in ("qrealign-mini-quality", "qrealign-pro-aesthetics")
    }  # fmt: skip


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("preset", ["qrealign-mini-quality", "qrealign-pro-aesthetics"])
def test_every_entry_point_loads_a_qrealign_preset_by_name(images, qrealign_task_scores, entry, preset):
    """Any size and task, by name (the tiny checkpoint stands in for the released weights): each entry point scores
    with that preset's prompt, on its 0..1 scale."""
    quality, aesthetics = qrealign_task_scores.values()
    assert (quality - aesthetics).abs().min() > 1e-4  # the two prompts score differently: the check can tell
    rewards = _call(entry, _build(entry, model=QREALIGN_TINY, preset=preset), images).float()
    torch.testing.assert_close(rewards, qrealign_task_scores[preset], atol=1e-5, rtol=0)
    assert ((rewards >= 0) & (rewards <= 1)).all()
