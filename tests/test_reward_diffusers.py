"""Best-of-N on a tiny Stable Diffusion pipeline built offline, ranked by the ArtQuant fixture and by the tiny
Q-ReAlign scorer (guidance: test_reward_guidance.py; DRaFT-K: test_reward_draft.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from artquant.reward import best_of_n, best_of_n_to_folder
from diffusers import StableDiffusionPipeline
from PIL import Image
from reward_tiny_pipelines import (
    QREALIGN_PRESET,
    QREALIGN_TINY,
    SCORE_RANGES,
    SIZE,
    fresh_scorer,
    tiny_flux,
    tiny_sd,
)

STEPS = 6


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    return tiny_sd(seed)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module", params=list(SCORE_RANGES))
def scorer(request):
    # Its own scorer: rewards freeze the model in place, which must not leak into the shared fixtures.
    return fresh_scorer(request.param, request)


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
    # Scored in batches of 2 there and of 5 here: equal within float32 noise, not bit for bit.
    assert candidates[0].score == pytest.approx(max(independent), abs=1e-5)
    assert [c.score for c in candidates] == pytest.approx(sorted(independent, reverse=True), abs=1e-5)
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
    # The NaN image leaves its scoring batch, so the others are scored in other batch shapes: a stated tolerance.
    kept = {c.seed: c.score for c in candidates[:-1]}
    assert kept == pytest.approx({s: v for s, v in expected.items() if s != 2}, abs=1e-5)


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


def test_best_of_n_command_line(pipe, scorer, request, tmp_path):
    from artquant.cli import main as cli_main

    if scorer.preset.family == "qwen_vl":
        model = ["--model", str(QREALIGN_TINY), "--preset", QREALIGN_PRESET]
    else:
        model = ["--model", str(request.getfixturevalue("reference_dir") / "artquant_lora")]
    pipe.save_pretrained(tmp_path / "pipeline")
    code = cli_main(
        ["best-of-n", "--pipeline", str(tmp_path / "pipeline"), "--prompt", "a cat", "--n", "2", "--out", str(tmp_path / "out"),
         "--steps", "2", "--height", str(SIZE), "--width", str(SIZE), "--negative-prompt", "blurry",
         *model, "--device", "cpu", "--dtype", "fp32"]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((tmp_path / "out" / "scores.json").read_text())
    candidates = sorted(summary["candidates"], key=lambda e: e["seed"])
    assert [e["seed"] for e in candidates] == [0, 1]
    assert (tmp_path / "out" / "contact_sheet.png").is_file()
    written = [Image.open(tmp_path / "out" / e["file"]) for e in candidates]  # scored by the preset asked for
    assert [e["score"] for e in candidates] == pytest.approx([r.score for r in scorer.score(written)], abs=1e-5)


def test_best_of_n_command_line_passes_pipeline_arguments_and_offloads(pipe, reference_dir, tmp_path):
    from artquant.cli import main as cli_main

    pipe.save_pretrained(tmp_path / "pipeline")
    common = ["best-of-n", "--pipeline", str(tmp_path / "pipeline"), "--prompt", "a cat", "--n", "2", "--height",
              str(SIZE), "--width", str(SIZE), "--model", str(reference_dir / "artquant_lora"), "--device", "cpu"]  # fmt: skip
    code = cli_main([*common, "--out", str(tmp_path / "a"), "--pipe-arg", "num_inference_steps=2",
                     "--pipe-arg", "guidance_scale=1.5", "--offload"])  # fmt: skip
    assert code == 0
    offloaded = json.loads((tmp_path / "a" / "scores.json").read_text())
    code = cli_main([*common, "--out", str(tmp_path / "b"), "--steps", "2", "--guidance-scale", "1.5"])
    assert code == 0
    plain = json.loads((tmp_path / "b" / "scores.json").read_text())
    # The same pipeline arguments by either route, offloaded or not: the same candidates.
    assert [e["seed"] for e in offloaded["candidates"]] == [e["seed"] for e in plain["candidates"]]
    assert [e["score"] for e in offloaded["candidates"]] == pytest.approx([e["score"] for e in plain["candidates"]], abs=1e-5)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--pipe-arg", "steps"], "not key=value"),
        (["--steps", "2", "--pipe-arg", "num_inference_steps=3"], "given both"),
        (["--negative-prompt", "blurry", "--guidance-scale", "1.0"], "guidance_scale > 1"),
        (["--pipe-arg", "generator=1"], "sets 'generator' itself"),
    ],
)
def test_best_of_n_command_line_refuses_bad_pipeline_arguments(pipe, reference_dir, tmp_path, capsys, arguments, message):
    from artquant.cli import main as cli_main

    pipe.save_pretrained(tmp_path / "pipeline")
    code = cli_main(["best-of-n", "--pipeline", str(tmp_path / "pipeline"), "--prompt", "a cat", "--n", "1",
                     "--out", str(tmp_path / "out"), "--model", str(reference_dir / "artquant_lora"), *arguments])  # fmt: skip
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out" / "scores.json").exists()


def test_flux_negative_prompt_is_honoured_with_true_cfg_or_refused(scorer):
    flux = tiny_flux()
    options = dict(num_inference_steps=2, height=SIZE, width=SIZE, max_sequence_length=16, seeds=[0, 1])
    with pytest.raises(ValueError, match="true_cfg_scale > 1"):
        best_of_n(flux, "a cat", 2, scorer, negative_prompt="blurry", **options)
    plain = {c.seed: np.asarray(c.image) for c in best_of_n(flux, "a cat", 2, scorer, **options)}
    negative = best_of_n(flux, "a cat", 2, scorer, negative_prompt="blurry", true_cfg_scale=4.0, **options)
    assert all(np.abs(np.asarray(c.image, dtype=int) - plain[c.seed]).max() > 0 for c in negative)


def test_best_of_n_offload_keeps_the_results_and_the_models_where_they_were(pipe, scorer):
    options = dict(num_inference_steps=2, height=SIZE, width=SIZE, seeds=[4, 5])
    plain = best_of_n(pipe, "a cat", 2, scorer, **options)
    offloaded = best_of_n(pipe, "a cat", 2, scorer, offload=True, **options)
    assert [c.seed for c in offloaded] == [c.seed for c in plain]
    assert [c.score for c in offloaded] == pytest.approx([c.score for c in plain], abs=1e-6)
    assert next(scorer.model.parameters()).device == torch.device(scorer.device)
