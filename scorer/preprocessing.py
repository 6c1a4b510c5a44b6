"""Image preprocessing in torch, equal to the reference's PIL + CLIPImageProcessor path.

The reference pads each image to a square with the colour `int(mean * 255)`, resizes it with PIL's bicubic filter
(antialiased when shrinking, 8-bit fixed-point arithmetic) and centre-crops, rescales and normalises it. Here the
resampling is PIL's algorithm written as two small matrices (one per axis), so that

* uint8 images give PIL's pixels exactly (integer coefficients, rounding and clipping as PIL does), and
* float images give the same filter in real arithmetic, differentiable with respect to the pixels.

The padding is never materialised: every padded coordinate reads one constant slot, so a 20000 x 100 image costs
about as much as its own pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

PIL_PRECISION_BITS = 22  # Pillow's Resample.c: 32 - 8 (pixel) - 2 (headroom)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageProcessingConfig:
    """What `preprocessor_config.json` says (a CLIPImageProcessor); defaults are mPLUG-Owl2's 448 px."""

    resize_to: int = 448  # shortest edge after resizing
    crop_size: int = 448
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255

    @classmethod
    def from_dict(cls, values: dict) -> ImageProcessingConfig:
        size = values.get("size", {})
        crop = values.get("crop_size", {})
        resize_to = size.get("shortest_edge", size.get("height", cls.resize_to)) if isinstance(size, dict) else size
        crop_size = crop.get("height", resize_to) if isinstance(crop, dict) else crop
        if values.get("resample", 3) != 3:
            raise ValueError("Only bicubic resampling (resample=3) is supported, as mPLUG-Owl2 was trained with it.")
        return cls(
            resize_to=int(resize_to),
            crop_size=int(crop_size),
            image_mean=tuple(values.get("image_mean", CLIP_MEAN)),
            image_std=tuple(values.get("image_std", CLIP_STD)),
            rescale_factor=float(values.get("rescale_factor", 1 / 255)),
        )

    def to_dict(self) -> dict:
        """The CLIPImageProcessor `preprocessor_config.json` this describes."""
        return {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": self.resize_to},
            "resample": 3,
            "do_center_crop": True,
            "crop_size": {"height": self.crop_size, "width": self.crop_size},
            "do_rescale": True,
            "rescale_factor": self.rescale_factor,
            "do_normalize": True,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": True,
        }

    @property
    def pad_colour(self) -> tuple[int, int, int]:
        """The reference's padding colour: `int(mean * 255)` per channel (rounded down)."""
        return tuple(int(m * 255) for m in self.image_mean)


def _pil_bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@lru_cache(maxsize=64)
def _resample_matrix(
    padded_size: int, out_size: int, content_start: int, content_size: int, quantized: bool
) -> torch.Tensor:
    """[out_size, content_size + 1] float64 matrix; column `content_size` collects the padding's weight.

    The taps are Pillow's `precompute_coeffs` for the bicubic filter; quantized, they are its integer
    coefficients (`normalize_coeffs_8bpc`). Merging the padding's taps into one column is exact, as integer sums
    do not depend on their order.
    """
    scale = padded_size / out_size
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    taps_per_output = math.ceil(support) * 2 + 1
    centers = (np.arange(out_size) + 0.5) * scale
    first = np.maximum(np.trunc(centers - support + 0.5), 0).astype(np.int64)  # C's cast truncates toward zero
    last = np.minimum(np.trunc(centers + support + 0.5), padded_size).astype(np.int64)
    source = first[:, None] + np.arange(taps_per_output)
    weights = np.where(source < last[:, None], _pil_bicubic((source - centers[:, None] + 0.5) / filter_scale), 0.0)
    totals = np.cumsum(weights, axis=1)[:, -1:]  # summed left to right, as the C loop does
    weights = np.divide(weights, totals, out=weights.copy(), where=totals != 0)
    if quantized:
        weights = np.trunc(weights * (1 << PIL_PRECISION_BITS) + np.where(weights < 0, -0.5, 0.5))
    column = source - content_start
    column = np.where((column >= 0) & (column < content_size), column, content_size)
    matrix = np.zeros((out_size, content_size + 1))
    rows = np.broadcast_to(np.arange(out_size)[:, None], column.shape)
    np.add.at(matrix, (rows, column), weights)
    return torch.from_numpy(matrix)


def _clip8(accumulated: torch.Tensor) -> torch.Tensor:
    """Pillow's rounding of a fixed-point sum: add half, shift, clamp to [0, 255]."""
    half = float(1 << (PIL_PRECISION_BITS - 1))
    return torch.floor((accumulated + half) / float(1 << PIL_PRECISION_BITS)).clamp_(0, 255)


def pad_and_resize(images: torch.Tensor, out_size: int, fill: torch.Tensor) -> torch.Tensor:
    """Pads [B, C, h, w] to a centred square filled with `fill` [C] and resizes it to `out_size`, as PIL does.

    uint8 input: PIL's exact uint8 result (as float64 in [0, 255]). Float input in [0, 1]: the same filter in real
    arithmetic, clipped to [0, 1] after each pass (differentiable; the output keeps the input's dtype).
    """
    batch, channels, height, width = images.shape
    side = max(height, width)
    top, left = ((side - height) // 2, 0) if width > height else (0, (side - width) // 2)
    quantized = images.dtype == torch.uint8
    dtype = torch.float64 if quantized else images.dtype
    device = images.device
    horizontal = _resample_matrix(side, out_size, left, width, quantized).to(device, dtype)
    vertical = _resample_matrix(side, out_size, top, height, quantized).to(device, dtype)

    fill = fill.to(device, dtype).view(1, channels, 1, 1)
    pixels = images.to(dtype)
    # PIL resamples horizontally first, then vertically, rounding to 8 bits after each pass.
    rows = torch.cat([pixels, fill.expand(batch, channels, height, 1)], dim=3) @ horizontal.T
    padding_row = fill.expand(batch, channels, 1, width + 1) @ horizontal.T
    # Clipping after each pass, as PIL does, keeps bicubic overshoot out of the float path as well.
    clip = _clip8 if quantized else (lambda x: x.clamp(0, 1))
    rows, padding_row = clip(rows), clip(padding_row)
    return clip(vertical @ torch.cat([rows, padding_row], dim=2))


def pixel_values_from_images(images: torch.Tensor, config: ImageProcessingConfig) -> torch.Tensor:
    """RGB images [B, 3, H, W] -> the model's `pixel_values` [B, 3, crop, crop] (float32 unless input is float).

    uint8 in [0, 255]: bit-exact with the reference. Float in [0, 1]: differentiable; equal to the uint8 path up to
    PIL's 8-bit rounding.
    """
    if images.dtype == torch.uint8:
        fill = torch.tensor(config.pad_colour, dtype=torch.float64)
        resized = pad_and_resize(images, config.resize_to, fill).float()
        scale = config.rescale_factor
    else:
        fill = torch.tensor(config.pad_colour, dtype=images.dtype) / 255
        resized = pad_and_resize(images, config.resize_to, fill)
        scale = 1.0
    offset = (config.resize_to - config.crop_size) // 2
    cropped = resized[..., offset : offset + config.crop_size, offset : offset + config.crop_size]
    mean = torch.tensor(config.image_mean, dtype=cropped.dtype, device=cropped.device).view(1, 3, 1, 1)
    std = torch.tensor(config.image_std, dtype=cropped.dtype, device=cropped.device).view(1, 3, 1, 1)
    return (cropped * scale - mean) / std

