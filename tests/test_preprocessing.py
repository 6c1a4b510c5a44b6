"""The torch preprocessing equals the reference's PIL path; the float path is its differentiable twin."""

import numpy as np
import pytest
import torch
from PIL import Image

from artquant.scorer.preprocessing import ImageProcessingConfig, pad_and_resize, pixel_values_from_images

CONFIG = ImageProcessingConfig()


def _pil_reference(image: Image.Image, size: int) -> np.ndarray:
    """The reference: expand2square with int(mean * 255), then PIL bicubic (what CLIPImageProcessor calls)."""
    width, height = image.size
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), CONFIG.pad_colour)
    canvas.paste(image, ((side - width) // 2, 0) if height > width else (0, (side - height) // 2))
    return np.asarray(canvas.resize((size, size), Image.BICUBIC)).astype(np.float64)


def _ours(image: Image.Image, size: int) -> np.ndarray:
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]
    fill = torch.tensor(CONFIG.pad_colour, dtype=torch.float64)
    return pad_and_resize(tensor, size, fill)[0].permute(1, 2, 0).numpy()


# (1300, 900): a large downscale, where each output reads a small band of inputs and the products go block by block.
@pytest.mark.parametrize("size", [(160, 107), (107, 160), (300, 300), (33, 517), (1, 1), (1000, 3), (1300, 900)])
@pytest.mark.parametrize("out", [56, 448])
def test_uint8_resize_is_pil_exact(size, out):
    rng = np.random.default_rng(sum(size) + out)
    # Smooth content plus noise: exercises both flat regions and the 8-bit rounding.
    x = np.linspace(0, 255, size[0])[None, :, None] * np.linspace(0.2, 1, size[1])[:, None, None]
    array = np.clip(x + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(array)
    assert np.array_equal(_ours(image, out), _pil_reference(image, out))


def test_banded_products_are_used_and_equal_the_dense_one():
    """The CPU resize multiplies only the blocks of taps that reach each output band (far less work on a large
    downscale); summing integer taps block by block must give the dense product exactly."""
    from artquant.scorer.preprocessing import _blocks, _resample_matrix

    matrix = _resample_matrix(1300, 448, 0, 1300, True)[:, :1300]
    blocks = _blocks(matrix)
    assert len(blocks) > 30 and sum((e - f) * (t - s) for f, e, s, t in blocks) < 0.1 * matrix.numel()
    image = torch.randint(0, 256, (1, 3, 5, 1300), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).double()
    banded = torch.cat([image[..., s:t] @ matrix.T[s:t, f:e] for f, e, s, t in blocks], -1)
    assert torch.equal(banded, image @ matrix.T)


def test_real_photos_are_pil_exact(reference_images):
    for path in reference_images:
        image = Image.open(path).convert("RGB")
        assert np.array_equal(_ours(image, 448), _pil_reference(image, 448)), path.name


def test_float_path_matches_uint8_path_up_to_rounding():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (90, 140, 3), dtype=np.uint8)
    as_uint8 = torch.from_numpy(array).permute(2, 0, 1)[None]
    as_float = as_uint8.double() / 255
    exact = pixel_values_from_images(as_uint8, CONFIG)
    smooth = pixel_values_from_images(as_float, CONFIG)
    # PIL rounds to 8 bits twice; one level is 1 / 255 / std ~ 0.015 after normalisation.
    assert (exact.double() - smooth).abs().max() < 0.04
    assert smooth.dtype == torch.float64


def test_float_path_is_differentiable_everywhere_the_model_looks():
    image = torch.rand(1, 3, 64, 96, dtype=torch.float64, requires_grad=True)
    pixel_values_from_images(image, ImageProcessingConfig(resize_to=32, crop_size=32)).sum().backward()
    assert image.grad is not None
    assert (image.grad.abs().sum(1) > 0).all(), "every input pixel reaches the resized image"


def test_centre_crop_after_resize():
    config = ImageProcessingConfig(resize_to=10, crop_size=6)
    image = torch.arange(3 * 10 * 10, dtype=torch.float64).reshape(1, 3, 10, 10) / 300
    out = pixel_values_from_images(image, config)
    assert out.shape == (1, 3, 6, 6)
    mean = torch.tensor(config.image_mean, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(config.image_std, dtype=torch.float64).view(3, 1, 1)
    assert torch.allclose(out[0] * std + mean, image[0, :, 2:8, 2:8])


def test_preprocessor_config_round_trip(reference_dir):
    import json

    values = json.loads((reference_dir / "mplug_owl2_base" / "preprocessor_config.json").read_text())
    config = ImageProcessingConfig.from_dict(values)
    assert (config.resize_to, config.crop_size) == (56, 56)
    assert ImageProcessingConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="bicubic"):
        ImageProcessingConfig.from_dict({**values, "resample": 2})


# Both sides of `_pil_is_faster`: small (PIL), large non-square (ours), large square (PIL), 1 px, a sliver.
@pytest.mark.parametrize("size", [(160, 107), (107, 160), (56, 56), (1, 1), (1000, 3), (1300, 900), (1024, 1024)])
def test_uint8_pixel_values_are_the_references_whichever_resize_runs(size):
    """On the CPU, uint8 images are padded and resized by PIL itself or by `pad_and_resize`, whichever is faster for
    the size; both must give the reference's pixels (decoded images arrive channels-last, as here)."""
    from artquant.scorer.preprocessing import _mean_and_std

    rng = np.random.default_rng(size[0] * 7 + size[1])
    arrays = rng.integers(0, 256, (2, size[1], size[0], 3), dtype=np.uint8)
    config = ImageProcessingConfig(resize_to=48, crop_size=40)
    ours = pixel_values_from_images(torch.from_numpy(arrays).permute(0, 3, 1, 2), config)
    reference = torch.from_numpy(np.stack([_pil_reference(Image.fromarray(a), 48) for a in arrays])).permute(0, 3, 1, 2)
    mean, std = _mean_and_std(config, torch.float32, torch.device("cpu"))
    assert torch.equal(ours, (reference.float()[..., 4:44, 4:44] * config.rescale_factor - mean) / std)
