"""DRaFT-K LoRA fine-tuning on tiny SD 1.x, SDXL, SD3 and Flux pipelines: the reward rises, the saved LoRA
reproduces the images, gradients flow through exactly the last K steps, and the script runs; with the tiny Q-ReAlign
scorer as the reward, its gradients reach the LoRA and are the LoRA's true gradients."""

from __future__ import annotations

import pytest
import torch
from artquant import ArtQuantScorer
from artquant.reward import ArtQuantReward
from artquant.reward.finetune import (
    add_lora,
    denoiser_name,
    draft_finetune,
    main,
    sample_with_last_k_gradients,
    save_lora,
)
from reward_tiny_pipelines import BUILDERS, CALL_OPTIONS, QREALIGN_PRESET, QREALIGN_TINY, SIZE, tiny_qrealign_scorer

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4
PROMPTS, SEEDS = ["a cat", "a red house", "the sea"] * 2, [0, 1, 2, 3, 4, 5]
OPTIONS = CALL_OPTIONS  # each pipeline's own guidance: classifier-free for SD/SDXL/SD3, embedded for Flux


@pytest.fixture(scope="module")
def reward(reference_dir):
    scorer = ArtQuantScorer.from_pretrained(reference_dir / "artquant_lora", device="cpu", dtype="fp32")
    return ArtQuantReward(scorer)


def generate(pipe, family):
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    options = dict(OPTIONS[family], num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="pt")
    return pipe(PROMPTS, generator=generators, **options).images


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_draft_raises_the_mean_reward_and_its_saved_lora_reproduces_the_images(reward, family, tmp_path):
    pipe = BUILDERS[family]()
    before, _ = reward(generate(pipe, family))
    history = draft_finetune(
        pipe,
        reward,
        PROMPTS[:3],
        steps=20,
        k=2,
        batch_size=3,
        learning_rate=3e-2,
        num_inference_steps=STEPS,
        height=SIZE,
        width=SIZE,
        **OPTIONS[family],
    )
    after_images = generate(pipe, family)
    after, _ = reward(after_images)
    assert len(history) == 20
    assert after.mean() > before.mean() + 0.015  # 0.02 to 0.16 here; the tiny scorer's scores span ~0.5
    assert all(not p.requires_grad for p in reward.scorer.model.parameters())

    path = save_lora(pipe, tmp_path / "lora")
    reloaded = BUILDERS[family]()
    reloaded.load_lora_weights(str(path.parent))
    torch.testing.assert_close(generate(reloaded, family), after_images, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_gradients_flow_through_exactly_the_last_k_steps(family):
    pipe = BUILDERS[family]()
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    grad_enabled: list[bool] = []
    denoiser.register_forward_pre_hook(lambda module, args: grad_enabled.append(torch.is_grad_enabled()))
    images = sample_with_last_k_gradients(
        pipe, ["a cat"], [torch.Generator().manual_seed(0)], 5, 2, height=SIZE, width=SIZE, **CALL_OPTIONS[family]
    )
    assert grad_enabled == [False, False, False, True, True]
    assert images.requires_grad and torch.is_grad_enabled()  # the caller's mode (on) comes back
    denoiser.requires_grad_(False)
    grad_enabled.clear()
    with torch.no_grad():
        sample_with_last_k_gradients(
            pipe, ["a cat"], [torch.Generator().manual_seed(0)], 3, 3, height=SIZE, width=SIZE, **CALL_OPTIONS[family]
        )
        assert not torch.is_grad_enabled()  # the caller's mode comes back
    assert grad_enabled == [True, True, True]


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_finetune_script_writes_a_loadable_lora(reference_dir, tmp_path, family):
    BUILDERS[family]().save_pretrained(tmp_path / "pipeline")
    (tmp_path / "prompts.txt").write_text("a cat\n\nthe sea\n")
    pipe_args = [arg for key, value in CALL_OPTIONS[family].items() for arg in ("--pipe-arg", f"{key}={value}")]
    main(["--pipeline", str(tmp_path / "pipeline"), "--prompts", str(tmp_path / "prompts.txt"),
          "--out", str(tmp_path / "lora"), "--model", str(reference_dir / "artquant_lora"), "--steps", "2",
          "--inference-steps", "3", "--height", str(SIZE), "--width", str(SIZE), *pipe_args])  # fmt: skip
    reloaded = BUILDERS[family]()
    reloaded.load_lora_weights(str(tmp_path / "lora"))
    denoiser = getattr(reloaded, "unet", None) or reloaded.transformer
    assert any("lora" in name for name, _ in denoiser.named_parameters())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"k": 0}, "k must be between 1 and num_inference_steps"),
        ({"k": 5}, "k must be between 1 and num_inference_steps"),
        ({"prompts": []}, "non-empty list"),
        ({"prompts": ["a cat", ""]}, "non-empty strings"),
    ],
)
def test_draft_refuses_bad_arguments(reward, arguments, message):
    options = dict(prompts=["a cat"], steps=1, k=1, num_inference_steps=STEPS) | arguments
    with pytest.raises(ValueError, match=message):
        draft_finetune(BUILDERS["sd"](), reward, **options)


def test_draft_refuses_a_pipeline_without_a_denoiser(reward):
    pipe = BUILDERS["sd"]()
    pipe.unet = None
    with pytest.raises(ValueError, match="UNet or a transformer"):
        draft_finetune(pipe, reward, ["a cat"], steps=1, num_inference_steps=2)


def test_finetune_script_refuses_a_malformed_pipe_arg(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--pipeline", str(tmp_path), "--prompts", "a cat", "--out", str(tmp_path / "lora"), "--pipe-arg", "oops"])
    assert exit_info.value.code == 2 and "key=value" in capsys.readouterr().err


def test_gradient_checkpointing_trains_the_same_lora(reward):
    trained = {}
    for checkpointing in (False, True):
        pipe = BUILDERS["sdxl"]()
        history = draft_finetune(
            pipe, reward, ["a cat"], steps=2, k=2, batch_size=1, learning_rate=1e-2, num_inference_steps=3,
            height=SIZE, width=SIZE, gradient_checkpointing=checkpointing,
        )  # fmt: skip
        assert pipe.unet.is_gradient_checkpointing == checkpointing
        lora = {name: p.detach().clone() for name, p in pipe.unet.named_parameters() if "lora" in name}
        trained[checkpointing] = history, lora
    assert trained[True][0] == pytest.approx(trained[False][0], abs=1e-5)
    for name, weight in trained[False][1].items():
        torch.testing.assert_close(trained[True][1][name], weight, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Q-ReAlign as the reward
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qrealign_reward():
    return ArtQuantReward(tiny_qrealign_scorer())


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_qrealign_reward_gradients_reach_the_lora_and_are_its_true_gradients(qrealign_reward, family):
    pipe = BUILDERS[family]()
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    denoiser = getattr(pipe, denoiser_name(pipe))
    add_lora(denoiser)
    lora = dict((name, p) for name, p in denoiser.named_parameters() if p.requires_grad)

    def reward_of_samples():
        noise = [torch.Generator().manual_seed(s) for s in SEEDS[:2]]
        # K = all steps: the gradient is then the exact one, which finite differences can check.
        images = sample_with_last_k_gradients(
            pipe, PROMPTS[:2], noise, STEPS, STEPS, height=SIZE, width=SIZE, **OPTIONS[family]
        )
        return qrealign_reward.differentiable(images.float()).sum()

    reward_of_samples().backward()
    gradients = {name: p.grad.clone() for name, p in lora.items()}
    assert all(torch.isfinite(g).all() for g in gradients.values())
    # LoRA starts with B = 0, so only the B matrices get gradients at first; every one of them does.
    assert all(g.abs().sum() > 0 for name, g in gradients.items() if "lora_B" in name)
    norm = torch.sqrt(sum((g**2).sum() for g in gradients.values()))

    def moved(step):
        with torch.no_grad():
            for name, p in lora.items():
                p.add_(step * gradients[name] / norm)
            value = float(reward_of_samples())
            for name, p in lora.items():
                p.sub_(step * gradients[name] / norm)
        return value

    # float32 pipelines: a step of 1e-3 keeps both the curvature and the rounding within ~3% of the derivative here
    # (the pipelines clamp their images to [0, 1]: samples that reach the clamp would need smaller steps).
    step = 1e-3
    assert (moved(step) - moved(-step)) / (2 * step) == pytest.approx(float(norm), rel=5e-2)


def test_draft_with_a_qrealign_reward_trains_and_its_saved_lora_reproduces_the_images(qrealign_reward, tmp_path):
    pipe = BUILDERS["flux"]()
    history = draft_finetune(
        pipe, qrealign_reward, PROMPTS[:3], steps=3, k=2, batch_size=3, learning_rate=3e-2, num_inference_steps=STEPS,
        height=SIZE, width=SIZE, **OPTIONS["flux"],
    )  # fmt: skip
    assert len(history) == 3 and all(0 < h < 1 for h in history)  # Q-ReAlign's scale
    trained = [p for name, p in pipe.transformer.named_parameters() if "lora_B" in name]
    assert trained and all(p.abs().sum() > 0 for p in trained)  # moved away from LoRA's zero start
    assert all(not p.requires_grad for p in qrealign_reward.scorer.model.parameters())
    after_images = generate(pipe, "flux")
    reloaded = BUILDERS["flux"]()
    reloaded.load_lora_weights(str(save_lora(pipe, tmp_path / "lora").parent))
    torch.testing.assert_close(generate(reloaded, "flux"), after_images, atol=1e-5, rtol=0)


def test_finetune_script_takes_a_qrealign_preset(tmp_path):
    BUILDERS["sd"]().save_pretrained(tmp_path / "pipeline")
    main(["--pipeline", str(tmp_path / "pipeline"), "--prompts", "a cat", "--out", str(tmp_path / "lora"),
          "--model", str(QREALIGN_TINY), "--preset", QREALIGN_PRESET, "--steps", "1", "--inference-steps", "2",
          "--height", str(SIZE), "--width", str(SIZE)])  # fmt: skip
    reloaded = BUILDERS["sd"]()
    reloaded.load_lora_weights(str(tmp_path / "lora"))
    assert any("lora" in name for name, _ in reloaded.unet.named_parameters())
