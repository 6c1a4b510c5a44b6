"""Reward guidance on every pipeline family (SD 1.x, SDXL, SD3, Flux; img2img and inpaint), its x0 table checked
against each scheduler's own forward process, its gradient checked against finite differences, and its refusals;
guided sampling and the gradients through the decode also with the tiny Q-ReAlign scorer as the reward."""

from __future__ import annotations

import math

import pytest
import torch
from artquant import ArtQuantScorer
from artquant.reward import ArtQuantReward, RewardGuidance
from artquant.reward.guidance import decode_latents, noise_level, predict_clean_latents, schedule_kind
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from PIL import Image
from reward_tiny_pipelines import (
    BUILDERS,
    CALL_OPTIONS,
    SIZE,
    fresh_scorer,
    tiny_flux,
    tiny_sd,
    tiny_sd3,
    tiny_sd_img2img,
    tiny_sd_inpaint,
    tiny_qrealign_scorer,
    tiny_sdxl,
)

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS, SEEDS = ["a cat", "a house", "the sea", "a red tree"], [0, 1, 2, 3]
STEPS = 6
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.fixture(scope="module")
def reward(reference_dir):
    scorer = ArtQuantScorer.from_pretrained(reference_dir / "artquant_lora", device="cpu", dtype="fp32")
    return ArtQuantReward(scorer)


def generate(pipe, family, prompts=PROMPTS, seeds=SEEDS, **kwargs):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    options = dict(CALL_OPTIONS[family], num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="pt")
    return pipe(list(prompts), generator=generators, **{**options, **kwargs}).images


def denoiser_timesteps(pipe) -> list[float]:
    """Records the timestep of every denoiser call (the steps the pipeline really runs)."""
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    seen: list[float] = []

    def record(module, args, kwargs):
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        seen.append(float(torch.as_tensor(timestep).flatten()[0]))

    denoiser.register_forward_pre_hook(record, with_kwargs=True)
    return seen


# ----------------------------------------------------------------------------------------------------------------
# The x0 table against each scheduler's own forward process
# ----------------------------------------------------------------------------------------------------------------
def _vp_velocity(x0, noise, timestep):
    """v = sqrt(a_t) eps - sqrt(1 - a_t) x0, as diffusers defines it (DDPMScheduler.get_velocity)."""
    return DDPMScheduler(**SD_BETAS).get_velocity(x0, noise, torch.tensor([int(timestep)]))


X0_CASES = {
    # name: (scheduler, forward process (x0, noise, t) -> x_t, model target (x0, noise, t) -> output)
    "DDIM epsilon": (DDIMScheduler(**SD_BETAS), "add_noise", "epsilon"),
    "DDIM v": (DDIMScheduler(**SD_BETAS, prediction_type="v_prediction"), "add_noise", "v"),
    "DDPM sample": (DDPMScheduler(**SD_BETAS, prediction_type="sample"), "add_noise", "sample"),
    "Euler epsilon": (EulerDiscreteScheduler(**SD_BETAS), "add_noise", "epsilon"),
    "Euler v": (EulerDiscreteScheduler(**SD_BETAS, prediction_type="v_prediction"), "add_noise", "v"),
    "Euler a epsilon": (EulerAncestralDiscreteScheduler(**SD_BETAS), "add_noise", "epsilon"),
    "LMS epsilon": (LMSDiscreteScheduler(**SD_BETAS), "add_noise", "epsilon"),
    "DPM++ epsilon": (DPMSolverMultistepScheduler(**SD_BETAS), "add_noise", "epsilon"),
    "DPM++ v": (DPMSolverMultistepScheduler(**SD_BETAS, prediction_type="v_prediction"), "add_noise", "v"),
    "DPM++ Karras epsilon": (DPMSolverMultistepScheduler(**SD_BETAS, use_karras_sigmas=True), "add_noise", "epsilon"),
    "DPM++ flow sigmas": (
        DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
        "add_noise",
        "flow",
    ),
    "FlowMatch Euler": (FlowMatchEulerDiscreteScheduler(shift=3.0), "scale_noise", "flow"),
}


class _PipelineWith:
    def __init__(self, scheduler):
        self.scheduler = scheduler


@pytest.mark.parametrize("case", list(X0_CASES))
def test_x0_formula_recovers_the_clean_latents_of_each_schedulers_forward_process(case):
    scheduler, forward, target = X0_CASES[case]
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    noise = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    for index in (1, 4, 8):
        timestep = scheduler.timesteps[index]
        if forward == "scale_noise":
            noisy = scheduler.scale_noise(x0, timestep[None], noise)
        else:
            noisy = scheduler.add_noise(x0, noise, timestep[None])
        output = {
            "epsilon": lambda: noise,
            "v": lambda: _vp_velocity(x0, noise, timestep),
            "sample": lambda: x0,
            "flow": lambda: noise - x0,
        }[target]()
        level = noise_level(scheduler, schedule_kind(_PipelineWith(scheduler)), timestep)
        torch.testing.assert_close(predict_clean_latents(noisy, output, level), x0, atol=1e-6, rtol=1e-6, msg=case)


# ----------------------------------------------------------------------------------------------------------------
# Guided samples score higher, on every family
# ----------------------------------------------------------------------------------------------------------------
def _sdxl_with_dpm():
    pipe = tiny_sdxl()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    return pipe


def _sd_with_euler_ancestral():
    pipe = tiny_sd()
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe


# Euler a re-noises after each step, which carries a smaller part of each nudge: a larger step size.
GUIDED_CASES = {
    "sd (DDIM)": ("sd", tiny_sd, 100.0),
    "sd (Euler a)": ("sd", _sd_with_euler_ancestral, 400.0),
    "sdxl (Euler)": ("sdxl", tiny_sdxl, 100.0),
    "sdxl (DPM++)": ("sdxl", _sdxl_with_dpm, 100.0),
    "sd3": ("sd3", tiny_sd3, 100.0),
    "flux": ("flux", tiny_flux, 100.0),
}


@pytest.mark.parametrize("case", list(GUIDED_CASES))
def test_guided_samples_score_higher_with_the_same_seeds(reward, case):
    family, build, scale = GUIDED_CASES[case]
    pipe = build()
    plain, _ = reward(generate(pipe, family))
    guidance = RewardGuidance(reward, scale=scale, start=STEPS // 2)
    with guidance.attached(pipe):
        guided, _ = reward(generate(pipe, family))
    assert [step.step for step in guidance.trace] == [3, 4, 5]
    assert guided.mean() > plain.mean() + 0.02  # 0.04 to 0.45 here; the tiny scorer's scores span ~0.5
    assert (guided > plain).sum() >= 3
    assert "step" not in vars(pipe.scheduler)  # detached again: later calls are unguided
    torch.testing.assert_close(reward(generate(pipe, family))[0], plain, atol=1e-6, rtol=0)


# Step sizes for the tiny Q-ReAlign reward (scores 0..1, ArtQuant's 1..10), chosen on these tiny random models: small
# enough that the samplers still respond about linearly to the nudges (the tiny SD3 and Flux transformers turn larger
# ones into unrelated images), larger where a nudge of that size hardly moves the result (Euler a re-noises).
QREALIGN_SCALES = {
    "sd (DDIM)": 3.0, "sd (Euler a)": 30.0, "sdxl (Euler)": 30.0, "sdxl (DPM++)": 30.0, "sd3": 3.0, "flux": 3.0,
}  # fmt: skip


@pytest.fixture(scope="module")
def qrealign_reward():
    return ArtQuantReward(tiny_qrealign_scorer())


@pytest.mark.parametrize("case", list(GUIDED_CASES))
def test_qrealign_guided_samples_score_higher_with_the_same_seeds(qrealign_reward, case):
    family, build, _ = GUIDED_CASES[case]
    scale = QREALIGN_SCALES[case]
    pipe = build()
    with torch.no_grad():  # the float reward: 8-bit rounding moves the tiny scorer about as much as this guidance
        plain = qrealign_reward.differentiable(generate(pipe, family))
    guidance = RewardGuidance(qrealign_reward, scale=scale, start=STEPS // 2)
    with guidance.attached(pipe), torch.no_grad():
        guided = qrealign_reward.differentiable(generate(pipe, family))
    assert [step.step for step in guidance.trace] == [3, 4, 5]
    assert all(0 < step.reward < 1 for step in guidance.trace)  # Q-ReAlign's scale
    assert guided.mean() > plain.mean() + 5e-4  # 1e-3 to 7e-3 here; the tiny scorer's scores span ~0.03
    assert (guided > plain).sum() >= 3


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_guidance_outside_its_step_range_changes_nothing(reward, family):
    pipe = BUILDERS[family]()
    plain = generate(pipe, family, PROMPTS[:1], SEEDS[:1])
    with RewardGuidance(reward, scale=100.0, start=STEPS).attached(pipe) as idle:
        guided = generate(pipe, family, PROMPTS[:1], SEEDS[:1])
    assert idle.trace == []
    torch.testing.assert_close(guided, plain, atol=0, rtol=0)


def test_each_guided_step_predicts_x0_at_the_timestep_the_loop_runs(reward):
    pipe = tiny_sd3()
    seen = denoiser_timesteps(pipe)
    with RewardGuidance(reward, scale=1.0, start=2, stop=4).attached(pipe) as guidance:
        generate(pipe, "sd3", PROMPTS[:1], SEEDS[:1])
    assert [step.step for step in guidance.trace] == [2, 3]
    assert [step.timestep for step in guidance.trace] == pytest.approx(seen[2:4])
    sigmas = pipe.scheduler.sigmas[2:4].tolist()  # flow matching: x_t = (1 - sigma) x0 + sigma noise
    assert [step.level.noise for step in guidance.trace] == pytest.approx(sigmas)
    assert [step.level.signal for step in guidance.trace] == pytest.approx([1 - s for s in sigmas])


# ----------------------------------------------------------------------------------------------------------------
# img2img and inpaint: the loop actually run
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def init_image():
    pixels = torch.rand(SIZE, SIZE, 3, generator=torch.Generator().manual_seed(5))
    return Image.fromarray((pixels.numpy() * 255).astype("uint8"))


def test_img2img_guides_the_steps_its_strength_leaves_at_their_own_timesteps(reward, init_image):
    pipe = tiny_sd_img2img()
    seen = denoiser_timesteps(pipe)
    options = dict(image=[init_image] * 2, strength=0.5, num_inference_steps=8)
    plain, _ = reward(generate(pipe, "sd", PROMPTS[:2], SEEDS[:2], **options))
    calls_per_run = len(seen)
    assert calls_per_run == 4  # strength 0.5 of 8 steps
    with RewardGuidance(reward, scale=100.0, start=1).attached(pipe) as guidance:
        guided, _ = reward(generate(pipe, "sd", PROMPTS[:2], SEEDS[:2], **options))
    run = seen[calls_per_run:]
    assert [step.step for step in guidance.trace] == [1, 2, 3]  # counted on the 4 steps run, not on 8
    assert [step.timestep for step in guidance.trace] == pytest.approx(run[1:])
    alphas = pipe.scheduler.alphas_cumprod
    assert [step.level.signal for step in guidance.trace] == pytest.approx([math.sqrt(alphas[int(t)]) for t in run[1:]])
    assert guided.mean() > plain.mean()


@pytest.mark.parametrize("unet_channels", [4, 9])
def test_inpaint_guides_with_4_and_9_channel_unets(reward, init_image, unet_channels):
    pipe = tiny_sd_inpaint(in_channels=unet_channels)
    seen = denoiser_timesteps(pipe)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (0, 0, SIZE, SIZE // 2))  # repaint the top half
    options = dict(image=[init_image] * 4, mask_image=[mask] * 4, strength=1.0)
    plain, _ = reward(generate(pipe, "sd", **options))
    with RewardGuidance(reward, scale=100.0, start=3).attached(pipe) as guidance:
        guided, _ = reward(generate(pipe, "sd", **options))
    assert [step.timestep for step in guidance.trace] == pytest.approx(seen[STEPS + 3 :])
    assert guided.mean() > plain.mean()


# ----------------------------------------------------------------------------------------------------------------
# d reward / d latents through the VAE decode, per family, against finite differences (float64)
# ----------------------------------------------------------------------------------------------------------------
# Per scorer: how far the decode is shrunk into (-1, 1) (rather than clamped: a clamp's kinks would break the finite
# differences; Qwen's bicubic upscaling of the 16 x 16 decode clamps its own overshoot at [0, 1], hence a quarter),
# the step, whether the random direction has unit length, and the tolerance.
#   ArtQuant: its float32 steps leave ~2e-7 of noise in a score and the derivatives are curved: a step of 3e-3
#     keeps both errors near 3e-5.
#   Q-ReAlign: Qwen3.5 keeps its gated delta rule's decay in float32 (~1e-6 of noise in a double score) and the tiny
#     model is more curved: a step of 1e-3; along the gradient the signal dwarfs the noise, along a random unit
#     direction the derivative (~5e-3) is checked to that noise.
DECODE_GRADIENT_CHECKS = {
    "artquant": dict(shrink=2, step=3e-3, unit_random=False, rel=1e-2, abs=5e-5),
    "qrealign": dict(shrink=4, step=1e-3, unit_random=True, rel=2e-2, abs=2e-3),
}


@pytest.fixture(scope="module", params=list(DECODE_GRADIENT_CHECKS))
def float64_reward(request) -> tuple[str, ArtQuantReward]:
    scorer = fresh_scorer(request.param, request)
    scorer.model.double()
    scorer.dtype = torch.float64
    return request.param, ArtQuantReward(scorer, gradient_checkpointing=False)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_reward_gradient_through_the_decode_matches_finite_differences(float64_reward, family):
    scorer_name, reward = float64_reward
    check = DECODE_GRADIENT_CHECKS[scorer_name]
    pipe = BUILDERS[family]()
    pipe.vae.double()
    generator = torch.Generator().manual_seed(1)
    latent_size = SIZE // pipe.vae_scale_factor
    if family == "flux":  # packed: [B, (h/2)(w/2), 4 channels x 2 x 2]
        shape, grid = (1, (latent_size // 2) ** 2, 16), (latent_size // 2, latent_size // 2)
    else:
        shape, grid = (1, 4, latent_size, latent_size), None
    latents = torch.randn(shape, generator=generator, dtype=torch.float64) * 0.5

    def reward_of(x):
        images = decode_latents(pipe, x, grid)  # these random VAEs decode to within (-2, 2)
        return reward.differentiable(images / check["shrink"], value_range=(-1, 1)).sum()

    x = latents.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(reward_of(x), x)
    assert torch.isfinite(gradient).all() and gradient.norm() > 1e-2  # far above the noise of either scorer
    # Along the gradient itself (a strong signal) and along a random direction.
    random = torch.randn(shape, generator=generator, dtype=torch.float64)
    directions = [gradient / gradient.norm(), random / random.norm() if check["unit_random"] else random]
    step = check["step"]
    for direction in directions:
        with torch.no_grad():
            difference = (reward_of(latents + step * direction) - reward_of(latents - step * direction)) / (2 * step)
        expected = float((gradient * direction).sum())
        assert float(difference) == pytest.approx(expected, rel=check["rel"], abs=check["abs"])


# ----------------------------------------------------------------------------------------------------------------
# What guidance refuses, with advice that fits the pipeline
# ----------------------------------------------------------------------------------------------------------------
def _with_scheduler(build, scheduler_class, **config):
    pipe = build()
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **config)
    return pipe


REFUSALS = [
    ("SD with PNDM", lambda: _with_scheduler(tiny_sd, PNDMScheduler), "DDIMScheduler.from_config"),
    ("SD with UniPC", lambda: _with_scheduler(tiny_sd, UniPCMultistepScheduler), "DPMSolverMultistepScheduler"),
    ("SDXL with Heun", lambda: _with_scheduler(tiny_sdxl, HeunDiscreteScheduler), "EulerDiscreteScheduler.from_config"),
    ("SD with LCM", lambda: _with_scheduler(tiny_sd, LCMScheduler), "DDIMScheduler, DDPMScheduler, Euler"),
    ("SD3 with DDIM", lambda: _with_scheduler(tiny_sd3, DDIMScheduler), "FlowMatchEulerDiscreteScheduler.from_config"),
    ("Flux with flow Heun", lambda: _with_scheduler(tiny_flux, FlowMatchHeunDiscreteScheduler), "FlowMatchEuler"),
    ("SD with Euler, flow prediction", lambda: _with_scheduler(tiny_sd, EulerDiscreteScheduler, prediction_type="flow_prediction"), "prediction_type"),  # noqa: E501
]


@pytest.mark.parametrize(("name", "build", "message"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_unsupported_schedulers_are_refused_with_fitting_advice(reward, name, build, message):
    pipe = build()
    with pytest.raises(ValueError, match=message), RewardGuidance(reward, scale=1.0).attached(pipe):
        pass
    assert "step" not in vars(pipe.scheduler)


def test_guidance_bad_arguments(reward):
    pipe = tiny_sd()
    with pytest.raises(TypeError, match="attached"):
        generate(pipe, "sd", callback_on_step_end=RewardGuidance(reward, scale=1.0))
    with pytest.raises(ValueError, match="start <= stop"):
        RewardGuidance(reward, scale=1.0, start=4, stop=2)
    pipe.vae = None
    with pytest.raises(ValueError, match="VAE"), RewardGuidance(reward, scale=1.0).attached(pipe):
        pass
    with pytest.raises(ValueError, match="latent_grid"):
        decode_latents(tiny_flux(), torch.zeros(1, 16, 16))


def test_guidance_never_moves_zscore_statistics(reference_dir):
    scorer = ArtQuantScorer.from_pretrained(reference_dir / "artquant_lora", device="cpu", dtype="fp32")
    reward = ArtQuantReward(scorer, normalize="zscore")
    pipe = tiny_sd()
    with RewardGuidance(reward, scale=1.0).attached(pipe):
        generate(pipe, "sd", PROMPTS[:1], SEEDS[:1])
    assert reward.moments.count == 0
