"""Q-ReAlign (Qwen3.5-VL) presets: fidelity to the authors' inference code, batching, gradients, bad inputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from artquant import ArtQuantScorer
from artquant.scorer import CheckpointError
from artquant.scorer.images import load_images
from artquant.scorer.qwen_vl import QwenImageConfig, QwenVLScorer

FIDELITY = 1e-4  # the issue's bound against the authors' code; observed ~1e-6 in fp32
BATCHING = 1e-5  # the same image alone or in a padded batch of other sizes: float rounding only


@pytest.fixture(scope="module")
def images(qrealign_images):
    return qrealign_images


@pytest.fixture(scope="module")
def aesthetics_scorer(qrealign_scorer):
    """The aesthetics preset on the same loaded weights, as the ComfyUI loader shares them."""
    model = qrealign_scorer
    from artquant.scorer.checkpoint import LoadedCheckpoint

    checkpoint = LoadedCheckpoint(model.model, model.tokenizer, model.image_config, model.source)
    return ArtQuantScorer.from_checkpoint(checkpoint, "qrealign-mini-aesthetics", model.device, model.dtype)


def test_preset_family_gives_a_qwen_scorer(qrealign_scorer, qrealign_dir):
    assert type(qrealign_scorer) is QwenVLScorer
    assert qrealign_scorer.preset.score_range == (0.0, 1.0)
    assert isinstance(ArtQuantScorer.load_image_config(qrealign_dir, preset="qrealign-pro-aesthetics"), QwenImageConfig)


@pytest.mark.parametrize("task", ["quality", "aesthetics"])
def test_scores_match_the_authors_code_one_at_a_time_and_batched(task, qrealign_scorer, aesthetics_scorer, images,
                                                                 qrealign_golden):
    scorer = qrealign_scorer if task == "quality" else aesthetics_scorer
    expected = [qrealign_golden["scores"][task][path.name] for path in images]
    alone = [scorer.score([path])[0] for path in images]
    batched = scorer.score(images, batch_size=4)  # sizes from 9 x 900 to 300 x 220: rows of different lengths
    for result, want in zip(alone, expected):
        assert result.ok and result.score == pytest.approx(want, abs=FIDELITY)
    for result, single, path in zip(batched, alone, images):
        assert result.source == str(path.resolve())
        assert result.score == pytest.approx(single.score, abs=BATCHING)
    # Differences between the images are far larger than the tolerance: the comparison can tell them apart.
    assert max(expected) - min(expected) > 100 * FIDELITY


def test_prompt_and_patches_are_the_processors(qrealign_scorer, images, qrealign_golden):
    """transformers' own processor (recorded by the golden script, torchvision backend) and ours agree exactly."""
    for path, image in zip(images, load_images(images)):
        want = qrealign_golden["processor"][path.name]
        pixels = qrealign_scorer.image_config.pixel_values(image[None])
        inputs, lengths = qrealign_scorer._model_inputs(pixels, qrealign_scorer.prompt_parts)
        assert inputs["input_ids"][0].tolist() == want["input_ids"]
        assert inputs["mm_token_type_ids"][0].tolist() == want["mm_token_type_ids"]
        assert pixels.grid_thw[0].tolist() == want["image_grid_thw"]
        patches = pixels.patches.double()
        assert list(patches.shape) == want["patches_shape"]
        assert patches.flatten()[:16].tolist() == pytest.approx(want["patches_head"], abs=1e-6)
        weights = torch.linspace(-1, 1, patches.numel()).view_as(patches).double()
        for ours, theirs in [(patches.sum(), want["patches_sum"]), (patches.abs().sum(), want["patches_abs_sum"]),
                             ((patches * weights).sum(), want["patches_weighted_sum"])]:
            assert float(ours) == pytest.approx(theirs, rel=1e-7, abs=1e-4)


def test_padding_never_reaches_a_shorter_row(qrealign_scorer, images):
    """The shortest prompt beside the longest, in both orders, scores as it does alone."""
    tiny, long = load_images([images[2], images[4]])  # 4 x 4 patches, 20 x 2
    alone = qrealign_scorer.score([tiny])[0].score
    for order, tiny_at in (([tiny, long], [0]), ([long, tiny, tiny], [1, 2])):
        scores = [r.score for r in qrealign_scorer.score(order, batch_size=len(order))]
        assert [scores[i] for i in tiny_at] == pytest.approx([alone] * len(tiny_at), abs=BATCHING)


def test_score_tensor_is_differentiable_and_matches_the_uint8_path(qrealign_scorer):
    generator = torch.Generator().manual_seed(0)
    # 64 x 96 needs no resizing (multiples of 32 within the budget), so floats k/255 are the uint8 image exactly.
    pixels = torch.randint(0, 256, (2, 3, 64, 96), generator=generator, dtype=torch.uint8)
    floats = (pixels.float() / 255).requires_grad_()
    out = qrealign_scorer.score_tensor(floats)
    expected = [r.score for r in qrealign_scorer.score(pixels)]
    assert out.scores.tolist() == pytest.approx(expected, abs=BATCHING)
    out.scores.sum().backward()
    assert torch.isfinite(floats.grad).all() and floats.grad.abs().sum() > 0
    # A resized float image: the same filter without 8-bit rounding, so close to (not equal to) the uint8 score.
    resized = qrealign_scorer.score_tensor(torch.rand(1, 3, 50, 70, generator=generator, requires_grad=True))
    resized.scores.sum().backward()
    assert resized.scores.shape == (1,) and 0 <= float(resized.scores.detach()) <= 1


def test_describe_and_round_trip_through_save_pretrained(qrealign_scorer, images, tmp_path):
    texts = qrealign_scorer.describe([images[0], b"not an image"], max_new_tokens=3)
    assert isinstance(texts[0], str) and texts[1].startswith("[error:")
    qrealign_scorer.save_pretrained(tmp_path / "saved")
    again = ArtQuantScorer.from_pretrained(tmp_path / "saved", preset="qrealign-mini-quality", dtype="fp32")
    assert again.score([images[0]])[0].score == pytest.approx(qrealign_scorer.score([images[0]])[0].score, abs=1e-6)


def test_processor_config_as_transformers_5_saves_it(qrealign_dir, qrealign_scorer, images, tmp_path):
    """A checkpoint whose image settings sit in processor_config.json (nested under "image_processor") loads the same."""
    folder = tmp_path / "ckpt"
    shutil.copytree(qrealign_dir, folder)
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").unlink()
    (folder / "processor_config.json").write_text(json.dumps({"image_processor": settings, "processor_class": "Qwen3VLProcessor"}))
    scorer = ArtQuantScorer.from_pretrained(folder, preset="qrealign-mini-quality", dtype="fp32")
    assert scorer.image_config == qrealign_scorer.image_config
    assert scorer.score([images[0]])[0].score == pytest.approx(qrealign_scorer.score([images[0]])[0].score, abs=1e-6)


def test_chat_template_in_the_older_json_file(qrealign_dir, qrealign_scorer, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(qrealign_dir, folder)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    scorer = ArtQuantScorer.from_pretrained(folder, preset="qrealign-mini-quality", dtype="fp32")
    assert scorer.prompt_ids.tolist() == qrealign_scorer.prompt_ids.tolist()


@pytest.mark.parametrize("family", ["mplug_owl2", "qwen_vl"])
def test_to_moves_the_model_and_every_token_id_tensor(family, reference_dir, qrealign_dir):
    """Onto the meta device, which every tensor left behind would visibly not be on."""
    model, preset = (reference_dir / "mplug_owl2_base", "artquant") if family == "mplug_owl2" else (qrealign_dir, "qrealign-mini-quality")
    scorer = ArtQuantScorer.from_pretrained(model, preset=preset, dtype="fp32").to("meta")
    assert scorer.device == torch.device("meta")
    assert {p.device.type for p in scorer.model.parameters()} == {"meta"}
    assert scorer.prompt_ids.device.type == scorer.level_ids.device.type == "meta"


def test_compile_wraps_every_block_and_keeps_the_golden_scores(qrealign_dir, images, qrealign_golden):
    """`compile=` compiles each decoder layer and vision block (transformers' `_no_split_modules`); the eager backend
    checks the tracing in seconds."""
    scorer = ArtQuantScorer.from_pretrained(qrealign_dir, preset="qrealign-mini-quality", dtype="fp32",
                                            compile={"backend": "eager"})
    blocks = [m for m in scorer.model.modules() if type(m).__name__ in scorer.model._no_split_modules]
    assert len(blocks) == 6 and all(block._compiled_call_impl is not None for block in blocks)  # 4 layers, 2 blocks
    assert all("_orig_mod" not in name for name in scorer.model.state_dict())
    scores = [r.score for r in scorer.score(images[:3], batch_size=3)]
    expected = [qrealign_golden["scores"]["quality"][path.name] for path in images[:3]]
    assert scores == pytest.approx(expected, abs=FIDELITY)


def test_out_of_memory_splits_the_batch_and_fails_only_what_does_not_fit(qrealign_scorer, images, qrealign_golden,
                                                                         monkeypatch):
    """A device that holds two images at a time, and no image of more than 40 patches: the batch is scored in halves,
    the largest image gets an error naming memory, the others their golden scores."""
    level_logits = qrealign_scorer.level_logits
    calls = []

    def small_device(pixels):
        calls.append(len(pixels))
        if len(pixels) > 2 or int(pixels.grid_thw.prod(-1).max()) > 40:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return level_logits(pixels)

    monkeypatch.setattr(qrealign_scorer, "level_logits", small_device)
    results = qrealign_scorer.score(images, batch_size=6)
    too_large = {"large.png"}  # 6 x 8 patches; the others have 16 to 40
    for path, result in zip(images, results):
        if path.name in too_large:
            assert not result.ok and "does not fit into the cpu device's memory even alone" in result.error
            assert path.name in result.error
        else:
            assert result.score == pytest.approx(qrealign_golden["scores"]["quality"][path.name], abs=FIDELITY)
    assert calls[0] == 6 and max(calls[1:]) <= 3


def test_pixels_slice_by_image(qrealign_scorer, images):
    pixels = qrealign_scorer.image_config.collate([qrealign_scorer.image_config.pixel_values(image[None])
                                                   for image in load_images(images[:3])])
    middle = pixels[1:2]
    alone = qrealign_scorer.image_config.pixel_values(load_images(images[1:2])[0][None])
    assert torch.equal(middle.patches, alone.patches) and torch.equal(middle.grid_thw, alone.grid_thw)
    assert len(pixels[:2]) == 2 and len(pixels[2:]) == 1


def test_largest_batch_size_on_the_cpu(qrealign_scorer):
    assert qrealign_scorer.largest_batch_size() == 8


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs: what goes in, what must come out
# ----------------------------------------------------------------------------------------------------------------
def test_bad_images_are_per_image_errors(qrealign_scorer, images):
    results = qrealign_scorer.score([torch.zeros(3, 1, 300, dtype=torch.uint8), images[0], b"junk", "/no/such.png"])
    assert "more than 200 times longer than wide" in results[0].error
    assert results[1].ok
    assert results[2].error and results[3].error
    with pytest.raises(ValueError, match="float RGB images"):
        qrealign_scorer.score_tensor(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="NaN"):
        qrealign_scorer.score_tensor(torch.full((1, 3, 32, 32), float("nan")))


def _edit_json(folder, name, change):
    path = folder / name
    values = json.loads(path.read_text())
    change(values)
    path.write_text(json.dumps(values))


BROKEN_CHECKPOINTS = [
    # (id, how the copy is broken, error type, message fragment)
    ("no preprocessor config", lambda d: (d / "preprocessor_config.json").unlink(), CheckpointError,
     "has neither preprocessor_config.json nor processor_config.json"),
    ("processor config without image settings", lambda d: (d / "preprocessor_config.json").rename(
        d / "processor_config.json"), CheckpointError, 'has no "image_processor" settings'),
    ("CLIP preprocessor", lambda d: _edit_json(d, "preprocessor_config.json",
                                               lambda v: v.update(image_processor_type="CLIPImageProcessor")),
     CheckpointError, "not a Qwen2-VL image processor"),
    ("bilinear", lambda d: _edit_json(d, "preprocessor_config.json", lambda v: v.update(resample=2)),
     CheckpointError, "only 3 (bicubic)"),
    ("zero patch", lambda d: _edit_json(d, "preprocessor_config.json", lambda v: v.update(patch_size=0)),
     CheckpointError, "patch_size must be a positive whole number"),
    ("empty budget", lambda d: _edit_json(d, "preprocessor_config.json",
                                          lambda v: v.update(size={"shortest_edge": 9000, "longest_edge": 10})),
     CheckpointError, "pixel budget is empty"),
    ("preprocessor not JSON", lambda d: (d / "preprocessor_config.json").write_text("{"), CheckpointError,
     "is not valid JSON"),
    ("config not JSON", lambda d: (d / "config.json").write_text("[1]"), CheckpointError, "not an object"),
    ("no chat template", lambda d: (d / "chat_template.jinja").unlink(), CheckpointError, "has no chat template"),
    ("legacy chat template not JSON", lambda d: (d / "chat_template.jinja").rename(d / "chat_template.json"),
     CheckpointError, "is not valid JSON"),
    ("tokenizer of another model", lambda d: _edit_json(d, "config.json", lambda v: v.update(image_token_id=7)),
     CheckpointError, "does not match its model"),
    ("no weights", lambda d: (d / "model.safetensors").unlink(), CheckpointError, "cannot be loaded"),
    ("not a VLM", lambda d: _edit_json(d, "config.json", lambda v: v.pop("vision_config")), CheckpointError,
     "not a Qwen-VL model"),
]


@pytest.mark.parametrize("breaks, error, fragment", [pytest.param(*row[1:], id=row[0]) for row in BROKEN_CHECKPOINTS])
def test_broken_qwen_checkpoint(tmp_path, qrealign_dir, breaks, error, fragment):
    folder = tmp_path / "ckpt"
    shutil.copytree(qrealign_dir, folder)
    breaks(folder)
    with pytest.raises(error, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        ArtQuantScorer.from_pretrained(folder, preset="qrealign-mini-quality", dtype="fp32")


def test_wrong_family_and_arguments(reference_dir, qrealign_dir):
    with pytest.raises(CheckpointError, match="not a Qwen-VL model"):
        ArtQuantScorer.from_pretrained(reference_dir / "mplug_owl2_base", preset="qrealign-mini-quality")
    with pytest.raises(CheckpointError, match="not a Qwen-VL model"):  # as workers read it, before the model loads
        ArtQuantScorer.load_image_config(reference_dir / "mplug_owl2_base", preset="qrealign-mini-quality")
    with pytest.raises(CheckpointError, match="qrealign-\\* preset"):
        ArtQuantScorer.from_pretrained(qrealign_dir, preset="artquant")
    with pytest.raises(ValueError, match="`base` is not used"):
        ArtQuantScorer.from_pretrained(qrealign_dir, base=qrealign_dir, preset="qrealign-mini-quality")
    with pytest.raises(ValueError, match="Unknown preset 'qrealign-mini'"):
        ArtQuantScorer.from_pretrained(qrealign_dir, preset="qrealign-mini")
