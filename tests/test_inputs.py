"""Every input form scores the same; every bad input gets a clear, per-image answer."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from artquant.scorer import ImageInputError, load_images


def _scores(results):
    return [r.score for r in results]


def test_all_input_forms_give_the_same_scores(base_scorer, reference_images):
    paths = reference_images[:3]
    pil = [Image.open(p) for p in paths]
    arrays = [np.array(Image.open(p).convert("RGB")) for p in paths]
    expected = _scores(base_scorer.score(paths))
    assert _scores(base_scorer.score(pil)) == pytest.approx(expected, abs=1e-6)
    assert _scores(base_scorer.score(arrays)) == pytest.approx(expected, abs=1e-6)
    assert _scores(base_scorer.score([a.astype(np.float32) / 255 for a in arrays])) == pytest.approx(expected, abs=1e-6)
    # Torch BCHW in [0, 1] and ComfyUI's BHWC batch (same-size images only, so crop to a common size).
    crops = [a[:100, :100] for a in arrays]
    expected_crops = _scores(base_scorer.score(crops))
    bhwc = torch.from_numpy(np.stack(crops)).float() / 255
    assert _scores(base_scorer.score(bhwc)) == pytest.approx(expected_crops, abs=1e-6)
    assert _scores(base_scorer.score(bhwc.permute(0, 3, 1, 2))) == pytest.approx(expected_crops, abs=1e-6)
    assert _scores(base_scorer.score(bhwc, layout="BHWC")) == pytest.approx(expected_crops, abs=1e-6)


def test_scores_do_not_depend_on_the_batch(base_scorer, reference_images):
    alone = [base_scorer.score([p])[0].score for p in reference_images]
    together = _scores(base_scorer.score(reference_images * 3, batch_size=16))
    assert together == pytest.approx(alone * 3, abs=1e-5)


def test_grayscale_and_rgba_follow_convert_rgb(base_scorer, reference_dir):
    camera = reference_dir / "images" / "camera.png"  # mode L
    rgba = reference_dir / "images" / "rocket_rgba.png"
    rgb = Image.open(rgba).convert("RGB")
    assert base_scorer.score([rgba])[0].score == pytest.approx(base_scorer.score([rgb])[0].score, abs=1e-6)
    grey = np.array(Image.open(camera))
    assert base_scorer.score([camera])[0].score == pytest.approx(base_scorer.score([np.stack([grey] * 3, -1)])[0].score, abs=1e-6)
    one_channel = torch.from_numpy(grey)[None, None].float() / 255
    assert base_scorer.score(one_channel)[0].score == pytest.approx(base_scorer.score([camera])[0].score, abs=1e-6)


def test_odd_modes_and_sizes_score(base_scorer, tmp_path):
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg")
    rgb.convert("P").save(tmp_path / "palette.png")
    Image.fromarray(rng.integers(0, 65536, (30, 50), dtype=np.uint16)).save(tmp_path / "sixteen.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(tmp_path / "tiny.png")
    Image.fromarray(rng.integers(0, 256, (100, 20000, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    results = base_scorer.score(sorted(tmp_path.iterdir()))
    for result in results:
        assert result.ok, result.error
        assert 1.0 <= result.score <= 10.0


def test_sixteen_bit_images_are_scaled_not_clipped():
    sixteen = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    assert load_images(sixteen)[0].unique().tolist() == [128]


def test_bad_files_fail_alone(base_scorer, reference_images, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    truncated = reference_images[0].read_bytes()
    (tmp_path / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
    inputs = [reference_images[0], tmp_path / "empty.png", tmp_path / "text.png", tmp_path / "truncated.png",
              tmp_path / "missing.png", reference_images[1]]
    results = base_scorer.score(inputs)
    assert [r.ok for r in results] == [True, False, False, False, False, True]
    assert "empty" in results[1].error and "not an image" in results[2].error
    assert "truncated" in results[3].error and "no such file" in results[4].error
    assert all(math.isnan(r.score) for r in results[1:5])
    assert results[0].score == pytest.approx(base_scorer.score([reference_images[0]])[0].score)


def test_bad_tensors_fail_alone(base_scorer):
    batch = torch.rand(3, 3, 32, 32)
    batch[1, 0, 5, 5] = float("nan")
    results = base_scorer.score(batch)
    assert [r.ok for r in results] == [True, False, True]
    assert "NaN" in results[1].error
    with_inf = torch.rand(1, 3, 8, 8)
    with_inf[0, 0, 0, 0] = float("inf")
    assert "NaN or infinite" in base_scorer.score(with_inf)[0].error
    assert "[-1, 1]" in base_scorer.score(torch.rand(1, 3, 8, 8) * 2 - 1)[0].error
    assert "[0, 255]" in base_scorer.score(torch.rand(1, 3, 8, 8) * 255)[0].error


def test_wrong_layouts_say_so():
    entry = load_images([torch.rand(2, 7, 8, 9), np.zeros((4, 4, 3), dtype=np.uint8)])
    assert len(entry) == 3, "a 4-D batch counts as its images, even when it cannot be used"
    assert all(isinstance(e, ImageInputError) and "channel axis" in str(e) for e in entry[:2])
    assert entry[2].shape == (3, 4, 4), "the good input after a bad one still loads"
    assert "channels" in str(load_images(np.zeros((8, 8, 2), dtype=np.uint8))[0])
    assert "unsupported input type" in str(load_images([{"not": "an image"}])[0])
    assert "no pixels" in str(load_images(torch.rand(1, 3, 0, 5))[0])


def test_empty_batch_gives_no_results(base_scorer):
    assert base_scorer.score([]) == []
    assert base_scorer.score(torch.rand(0, 3, 8, 8)) == []
    with pytest.raises(ValueError, match="empty batch"):
        base_scorer.score_tensor(torch.rand(0, 3, 8, 8))


def test_score_tensor_guards_its_input(base_scorer):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        base_scorer.score_tensor(torch.rand(1, 8, 8, 3))
    with pytest.raises(ValueError, match="NaN"):
        base_scorer.score_tensor(torch.full((1, 3, 8, 8), float("nan")))


def test_score_tensor_keeps_the_graph(base_scorer, reference_images):
    image = torch.from_numpy(np.array(Image.open(reference_images[0]).convert("RGB"))).permute(2, 0, 1)[None] / 255
    image.requires_grad_(True)
    output = base_scorer.score_tensor(image)
    output.scores.sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    # Same picture, same score as the file path (up to PIL's 8-bit rounding in the file path).
    assert float(output.scores[0].detach()) == pytest.approx(base_scorer.score([reference_images[0]])[0].score, abs=2e-3)


def test_open_set_mass(base_scorer, reference_images):
    result = base_scorer.score(reference_images[:1], open_set=True)[0]
    assert 0.0 < result.open_set_mass < 1.0
    assert base_scorer.score(reference_images[:1])[0].open_set_mass is None
