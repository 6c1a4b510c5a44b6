"""Best-of-N, reward guidance and DRaFT-K fine-tuning on a tiny Stable Diffusion pipeline built offline."""

from __future__ import annotations

import copy
import json
import string

import numpy as np
import pytest
import torch
from artquant.reward import ArtQuantReward, RewardGuidance, best_of_n, best_of_n_to_folder
from artquant.reward.finetune import draft_finetune, main, save_lora
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

SIZE = 16  # pixels; the VAE halves it once
STEPS = 6


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A randomly initialised Stable Diffusion pipeline (character-level CLIP tokenizer, 2-level UNet and VAE)."""
    torch.manual_seed(seed)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for letter in string.ascii_lowercase:
        vocab[letter], vocab[letter + "</w>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16, pad_token="!")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=SIZE // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SIZE,
    )
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def scorer(lora_scorer):
    clone = copy.copy(lora_scorer)
    clone.model = copy.deepcopy(lora_scorer.model)  # rewards freeze the model in place; keep the fixture as it was
    return clone


def generate(pipe, prompts, seeds, **kwargs):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(list(prompts), generator=generators, num_inference_steps=STEPS, height=SIZE, width=SIZE, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Best-of-N
# ----------------------------------------------------------------------------------------------------------------
def test_best_of_n_ranks_by_score_and_seeds_reproduce_the_images(pipe, scorer):
    candidates = best_of_n(
        pipe,
        "a cat",
        5,
        scorer,
        batch_size=2,
        seed=10,
        num_inference_steps=STEPS,
        height=SIZE,
        width=SIZE,
        guidance_scale=2.0,
    )
    assert sorted(c.seed for c in candidates) == [10, 11, 12, 13, 14]
    independent = [r.score for r in scorer.score([c.image for c in candidates])]
    assert candidates[0].score == pytest.approx(max(independent), abs=1e-6)
    assert [c.score for c in candidates] == sorted(independent, reverse=True)
    for candidate in (candidates[0], candidates[-1]):
        alone = generate(pipe, ["a cat"], [candidate.seed], guidance_scale=2.0).images[0]
        difference = np.abs(np.asarray(alone, dtype=int) - np.asarray(candidate.image, dtype=int))
        assert difference.max() <= 1  # batched and single runs may round one level apart


@pytest.mark.parametrize("output_type", ["np", "pt"])
def test_best_of_n_reads_array_outputs_like_pil(pipe, scorer, output_type):
    options = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, seeds=[3, 1, 2])
    as_pil = best_of_n(pipe, "a dog", 3, scorer, **options)
    as_array = best_of_n(pipe, "a dog", 3, scorer, output_type=output_type, **options)
    assert [c.seed for c in as_array] == [c.seed for c in as_pil]
    assert [c.score for c in as_array] == pytest.approx([c.score for c in as_pil], abs=1e-6)


def test_a_nan_candidate_ranks_last_and_the_others_keep_their_scores(pipe, scorer):
    def pipe_with_a_broken_seed(generator, **kwargs):
        output = pipe(generator=generator, **kwargs)
        for row, generator_of_row in enumerate(generator):
            if generator_of_row.initial_seed() == 2:
                output.images[row, 0, 0] = float("nan")  # as an fp16 VAE overflow leaves it
        return output

    options = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="np", batch_size=2)
    expected = {c.seed: c.score for c in best_of_n(pipe, "a cat", 4, scorer, **options)}
    candidates = best_of_n(pipe_with_a_broken_seed, "a cat", 4, scorer, **options)
    assert candidates[-1].seed == 2 and "NaN" in candidates[-1].error and np.isnan(candidates[-1].score)
    assert {c.seed: c.score for c in candidates[:-1]} == {s: v for s, v in expected.items() if s != 2}


def test_best_of_n_refuses_what_it_cannot_honour(pipe, scorer):
    with pytest.raises(ValueError, match="output_type"):
        best_of_n(pipe, "a cat", 2, scorer, num_inference_steps=2, height=SIZE, width=SIZE, output_type="latent")
    with pytest.raises(TypeError, match="generator"):
        best_of_n(pipe, "a cat", 2, scorer, generator=torch.Generator())
    with pytest.raises(ValueError, match="3 seeds"):
        best_of_n(pipe, "a cat", 2, scorer, seeds=[1, 2, 3])


def test_best_of_n_to_folder_writes_images_scores_and_contact_sheet(pipe, scorer, tmp_path):
    pipe.save_pretrained(tmp_path / "pipeline")
    summary = best_of_n_to_folder(
        tmp_path / "pipeline",
        "a cat",
        3,
        tmp_path / "out",
        scorer,
        batch_size=2,
        seed=5,
        device="cpu",
        num_inference_steps=STEPS,
        height=SIZE,
        width=SIZE,
    )
    written = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert written == json.loads(json.dumps(summary))
    scores = [entry["score"] for entry in written["candidates"]]
    assert scores == sorted(scores, reverse=True) and {e["seed"] for e in written["candidates"]} == {5, 6, 7}
    for entry in written["candidates"]:
        image = Image.open(tmp_path / "out" / entry["file"])
        assert image.size == (SIZE, SIZE)
        assert scorer.score([image])[0].score == pytest.approx(entry["score"], abs=1e-6)
    sheet = np.asarray(Image.open(tmp_path / "out" / "contact_sheet.png").convert("L"))
    caption_strip = sheet[256:, :256]  # below the first thumbnail: its score is drawn there
    assert sheet.shape[1] == 3 * 256 and (caption_strip < 128).any()


def test_best_of_n_command_line(pipe, reference_dir, tmp_path):
    from artquant.cli import main as cli_main

    pipe.save_pretrained(tmp_path / "pipeline")
    code = cli_main(
        ["best-of-n", "--pipeline", str(tmp_path / "pipeline"), "--prompt", "a cat", "--n", "2", "--out", str(tmp_path / "out"),
         "--steps", "2", "--height", str(SIZE), "--width", str(SIZE), "--negative-prompt", "blurry",
         "--model", str(reference_dir / "artquant_lora"), "--device", "cpu", "--dtype", "fp32"]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert [e["seed"] for e in sorted(summary["candidates"], key=lambda e: e["seed"])] == [0, 1]
    assert (tmp_path / "out" / "contact_sheet.png").is_file()


# ----------------------------------------------------------------------------------------------------------------
# Reward guidance
# ----------------------------------------------------------------------------------------------------------------
def test_guided_samples_score_higher_with_the_same_seeds(pipe, scorer):
    reward = ArtQuantReward(scorer)
    prompts, seeds = ["a cat", "a house", "the sea", "a red tree"], [0, 1, 2, 3]
    plain, _ = reward(generate(pipe, prompts, seeds, output_type="pt").images)
    guidance = RewardGuidance(reward, scale=100.0, start=STEPS // 2)
    guided_images = generate(
        pipe,
        prompts,
        seeds,
        output_type="pt",
        callback_on_step_end=guidance,
        callback_on_step_end_tensor_inputs=guidance.tensor_inputs,
    ).images
    guided, _ = reward(guided_images)
    assert guided.mean() > plain.mean() + 0.01  # the tiny scorer's scores span ~0.3 over these samples
    assert (guided > plain).sum() >= 3


def test_guidance_outside_its_step_range_changes_nothing(pipe, scorer):
    reward = ArtQuantReward(scorer)
    plain = generate(pipe, ["a cat"], [0], output_type="pt").images
    idle = RewardGuidance(reward, scale=100.0, start=STEPS, stop=None)
    guided = generate(
        pipe,
        ["a cat"],
        [0],
        output_type="pt",
        callback_on_step_end=idle,
        callback_on_step_end_tensor_inputs=idle.tensor_inputs,
    ).images
    torch.testing.assert_close(guided, plain, atol=0, rtol=0)


def test_guidance_explains_unsupported_setups(scorer):
    euler = tiny_pipeline()
    euler.scheduler = EulerDiscreteScheduler.from_config(euler.scheduler.config)
    guidance = RewardGuidance(ArtQuantReward(scorer), scale=1.0)
    with pytest.raises(ValueError, match="DDIMScheduler.from_config"):
        generate(
            euler,
            ["a cat"],
            [0],
            callback_on_step_end=guidance,
            callback_on_step_end_tensor_inputs=guidance.tensor_inputs,
        )
    with pytest.raises(ValueError, match="tensor_inputs"):
        generate(tiny_pipeline(), ["a cat"], [0], callback_on_step_end=guidance)


# ----------------------------------------------------------------------------------------------------------------
# DRaFT-K fine-tuning
# ----------------------------------------------------------------------------------------------------------------
def test_draft_raises_the_mean_reward_of_a_fixed_prompt_set(scorer, tmp_path):
    pipe = tiny_pipeline()
    reward = ArtQuantReward(scorer)
    prompts, seeds = ["a cat", "a red house", "the sea"] * 2, [0, 1, 2, 3, 4, 5]
    before, _ = reward(generate(pipe, prompts, seeds, output_type="pt", guidance_scale=1.0).images)
    history = draft_finetune(
        pipe,
        reward,
        prompts[:3],
        steps=30,
        k=2,
        batch_size=3,
        learning_rate=3e-2,
        lora_rank=4,
        num_inference_steps=STEPS,
        height=SIZE,
        width=SIZE,
        seed=0,
    )
    after_images = generate(pipe, prompts, seeds, output_type="pt", guidance_scale=1.0).images
    after, _ = reward(after_images)
    assert len(history) == 30
    assert after.mean() > before.mean() + 0.02  # ~0.05 in practice; the tiny scorer's scores span ~0.3
    assert all(not p.requires_grad for p in scorer.model.parameters())

    path = save_lora(pipe, pipe.unet, tmp_path / "lora")
    reloaded = tiny_pipeline()
    reloaded.load_lora_weights(str(path.parent))
    again = generate(reloaded, prompts, seeds, output_type="pt", guidance_scale=1.0).images
    torch.testing.assert_close(again, after_images, atol=1e-4, rtol=0)


def test_finetune_script_writes_a_loadable_lora(pipe, reference_dir, tmp_path):
    pipe.save_pretrained(tmp_path / "pipeline")
    (tmp_path / "prompts.txt").write_text("a cat\n\nthe sea\n")
    main(["--pipeline", str(tmp_path / "pipeline"), "--prompts", str(tmp_path / "prompts.txt"),
          "--out", str(tmp_path / "lora"), "--model", str(reference_dir / "artquant_lora"), "--steps", "2",
          "--inference-steps", "3", "--guidance-scale", "2", "--height", str(SIZE), "--width", str(SIZE)])  # fmt: skip
    reloaded = tiny_pipeline()
    reloaded.load_lora_weights(str(tmp_path / "lora"))
    assert any("lora" in name for name, _ in reloaded.unet.named_parameters())
