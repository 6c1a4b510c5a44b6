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
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image

from .images import DEFAULT_MAX_PIXELS, ImageInputError, iter_image_loaders

PIL_PRECISION_BITS = 22  # Pillow's Resample.c: 32 - 8 (pixel) - 2 (headroom)
_BAND_ELEMENTS = 1 << 21  # pixels converted to float at a time in the first resampling pass (16 MiB in float64)
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
        """Reads a CLIPImageProcessor config; a ValueError names the value that is impossible or unsupported."""
        resize_to = _side_in_pixels("size", values.get("size", {}), cls.resize_to)
        crop_size = _side_in_pixels("crop_size", values.get("crop_size", {}), resize_to)
        if crop_size > resize_to:
            raise ValueError(f"crop_size ({crop_size} px) is larger than the resized image (size: {resize_to} px).")
        if values.get("resample", 3) != 3:
            raise ValueError(f"resample {values['resample']!r} is not supported: only 3 (bicubic), which mPLUG-Owl2 "
                             "was trained with.")
        for step in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if values.get(step, True) is not True:
                raise ValueError(f"{step} is {values[step]!r}, but mPLUG-Owl2's preprocessing always does this step.")
        image_mean = _three_numbers("image_mean", values.get("image_mean", CLIP_MEAN))
        image_std = _three_numbers("image_std", values.get("image_std", CLIP_STD))
        rescale_factor = values.get("rescale_factor", 1 / 255)
        if min(image_std) <= 0 or not _is_number(rescale_factor) or not rescale_factor > 0:
            raise ValueError(f"image_std {list(image_std)} and rescale_factor {rescale_factor!r} must be positive.")
        return cls(resize_to, crop_size, image_mean, image_std, float(rescale_factor))

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

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """See `pixel_values_from_images`; every image config has this method (Qwen-VL's gives patches instead)."""
        return pixel_values_from_images(images, self)

    def collate(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """One batch of `pixel_values` from the single images' (as `iter_pixel_batches` builds batches)."""
        return torch.cat(parts)

    def probe_pixel_values(self, batch: int, device, dtype) -> torch.Tensor:
        """`batch` blank images' `pixel_values`, to find the largest batch that fits (all images are this size)."""
        return torch.zeros(batch, 3, self.crop_size, self.crop_size, device=device, dtype=dtype)

    @property
    def pad_colour(self) -> tuple[int, int, int]:
        """The reference's padding colour: `int(mean * 255)` per channel (rounded down)."""
        return tuple(int(m * 255) for m in self.image_mean)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _side_in_pixels(name: str, value, default: int) -> int:
    """A square side from `size`/`crop_size`: a number, {"shortest_edge": n} or {"height": n, "width": n}."""
    if isinstance(value, dict):
        side = value.get("shortest_edge", value.get("height", default))
        if value.get("width", side) != side:
            raise ValueError(f"{name} {value} is not square; mPLUG-Owl2 takes square images.")
        value = side
    if not _is_number(value) or value != int(value) or value < 1:
        raise ValueError(f"{name} must be a positive whole number of pixels, not {value!r}.")
    return int(value)


def _three_numbers(name: str, value) -> tuple[float, float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(_is_number(v) for v in value):
        raise ValueError(f"{name} must be three numbers (red, green, blue), not {value!r}.")
    return tuple(float(v) for v in value)


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
    """Pillow's rounding of a fixed-point sum: add half, shift, clamp to [0, 255] (in place: sums are temporaries)."""
    half = float(1 << (PIL_PRECISION_BITS - 1))
    return accumulated.add_(half).div_(float(1 << PIL_PRECISION_BITS)).floor_().clamp_(0, 255)


def _clip01(resampled: torch.Tensor) -> torch.Tensor:
    return resampled.clamp(0, 1)


_BLOCK = 12  # outputs per block of the banded products on the CPU (8 .. 128 measured: 12 fastest)
_SMALL = 1 << 16  # resampling matrices with fewer entries are multiplied whole


def _blocks(matrix: torch.Tensor) -> tuple[tuple[int, int, int, int], ...]:
    """(first output, end, first input, end) of blocks of _BLOCK outputs of a resampling matrix [out, in] and the
    inputs their taps reach: a bicubic output reads a few inputs, so the products skip the zeros a dense one would
    multiply (a 1024 px side shrunk to 448: 1024 inputs per output, of which about 10 are taps). One block when that
    saves little, and on GPUs."""
    out_size, in_size = matrix.shape
    reached = matrix != 0
    blocks = []
    for first in range(0, out_size, _BLOCK):
        end = min(out_size, first + _BLOCK)
        inputs = reached[first:end].any(0).nonzero().flatten().tolist()
        blocks.append((first, end, inputs[0], inputs[-1] + 1) if inputs else (first, end, 0, 1))  # (0, 1): all zero
    work = sum((end - first) * (stop - start) for first, end, start, stop in blocks)
    # On a GPU one launch beats many; for small matrices (e.g. 160 -> 56 px) the dispatch of each product costs more
    # than the zeros it skips.
    dense = matrix.device.type != "cpu" or out_size * in_size < _SMALL or work > 0.5 * out_size * in_size
    return ((0, out_size, 0, in_size),) if dense else tuple(blocks)


@lru_cache(maxsize=16)
@torch.inference_mode(False)  # cached across calls: made as normal tensors, so differentiable calls can use them too
def _resize_plan(height: int, width: int, out_size: int, fill: tuple[float, ...], quantized: bool, dtype: torch.dtype,
                 device: torch.device) -> tuple:
    """What resizing an h x w image depends on besides its pixels, made once per geometry: the horizontal taps on the
    content [w, out] with their blocks and the padding's share of each output column [1, C, 1, out], the vertical
    taps on the content [out, h] with their blocks, and the padding rows' whole contribution [1, C, out, out]."""
    side = max(height, width)
    top, left = ((side - height) // 2, 0) if width > height else (0, (side - width) // 2)
    horizontal = _resample_matrix(side, out_size, left, width, quantized).to(device, dtype)
    vertical = _resample_matrix(side, out_size, top, height, quantized).to(device, dtype)
    fill_values = torch.tensor(fill, dtype=dtype, device=device).view(1, len(fill), 1, 1)
    clip = _clip8 if quantized else _clip01
    padding_row = clip(fill_values.squeeze(-1) * horizontal.sum(1))[..., None, :]
    return (horizontal[:, :width].T.contiguous(), _blocks(horizontal[:, :width]), fill_values * horizontal[:, width],
            vertical[:, :height].contiguous(), _blocks(vertical[:, :height]), vertical[:, height:] @ padding_row)


def pad_and_resize(images: torch.Tensor, out_size: int, fill: torch.Tensor) -> torch.Tensor:
    """Pads [B, C, h, w] to a centred square filled with `fill` [C] and resizes it to `out_size`, as PIL does.

    uint8 input: PIL's exact uint8 result (as float64 in [0, 255]). Float input in [0, 1]: the same filter in real
    arithmetic, clipped to [0, 1] after each pass (differentiable; the output keeps the input's dtype).
    The first pass reads the input in bands of rows, so no float copy of a whole large image is ever held.
    """
    batch, channels, height, width = images.shape
    quantized = images.dtype == torch.uint8
    dtype = torch.float64 if quantized else images.dtype
    columns, column_blocks, padding, rows_taps, row_blocks, padding_rows = _resize_plan(
        height, width, out_size, tuple(fill.tolist()), quantized, dtype, images.device)
    # Clipping after each pass, as PIL does, keeps bicubic overshoot out of the float path as well.
    clip = _clip8 if quantized else _clip01

    def horizontal_pass(part: torch.Tensor) -> torch.Tensor:
        part = part.to(dtype, memory_format=torch.contiguous_format)
        return torch.cat([part[..., start:stop] @ columns[start:stop, first:end]
                          for first, end, start, stop in column_blocks], -1)

    # PIL resamples horizontally first, then vertically, rounding to 8 bits after each pass. The padding's taps sit
    # in each matrix's last column; adding them apart from the content's is exact for integer sums (all < 2**53), as
    # is summing each output's taps block by block.
    band = max(1, _BAND_ELEMENTS // max(1, batch * channels * width))
    rows = clip(torch.cat([horizontal_pass(part) + padding for part in images.split(band, dim=2)], 2))
    resized = torch.cat([rows_taps[first:end, start:stop] @ rows[..., start:stop, :]
                         for first, end, start, stop in row_blocks], -2)
    return clip(resized + padding_rows)


def _pil_is_faster(height: int, width: int) -> bool:
    """Whether PIL resizes an image faster than `pad_and_resize` on the CPU (bench_resize.py, BENCHMARKS.md): PIL's
    lower overhead per call wins on small images and on squares; from about 768 px a non-square image is faster in
    ours, which never resizes the padding. Above 2048 px ours also avoids PIL's copy of the image."""
    side = max(height, width)
    return side <= 768 or (height == width and side <= 2048)


def _pil_pad_and_resize(image: torch.Tensor, out_size: int, fill: tuple[int, ...]) -> torch.Tensor:
    """uint8 [3, h, w] on the CPU -> the reference's own operations, run by PIL itself (the same pixels as
    `pad_and_resize`): expand2square with `fill`, then a bicubic resize to `out_size`."""
    _, height, width = image.shape
    picture = Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy()), "RGB")
    side = max(height, width)
    if height != width:
        square = Image.new("RGB", (side, side), fill)
        square.paste(picture, ((side - width) // 2, (side - height) // 2))
        picture = square
    return torch.from_numpy(np.array(picture.resize((out_size, out_size), Image.Resampling.BICUBIC))).permute(2, 0, 1)


def pixel_values_from_images(images: torch.Tensor, config: ImageProcessingConfig) -> torch.Tensor:
    """RGB images [B, 3, H, W] -> the model's `pixel_values` [B, 3, crop, crop] (float32 unless input is float).

    uint8 in [0, 255]: bit-exact with the reference. Float in [0, 1]: differentiable; equal to the uint8 path up to
    PIL's 8-bit rounding.
    """
    # Both uint8 paths give PIL's pixels (tested equal): PIL's own for small images on the CPU, the banded torch one
    # for large images and on GPUs.
    if images.dtype == torch.uint8 and images.device.type == "cpu" and _pil_is_faster(*images.shape[-2:]):
        resized = torch.stack([_pil_pad_and_resize(image, config.resize_to, config.pad_colour) for image in images]).float()
        scale = config.rescale_factor
    elif images.dtype == torch.uint8:
        fill = torch.tensor(config.pad_colour, dtype=torch.float64)
        resized = pad_and_resize(images, config.resize_to, fill).float()
        scale = config.rescale_factor
    else:
        fill = torch.tensor(config.pad_colour, dtype=images.dtype) / 255
        resized = pad_and_resize(images, config.resize_to, fill)
        scale = 1.0
    offset = (config.resize_to - config.crop_size) // 2
    cropped = resized[..., offset : offset + config.crop_size, offset : offset + config.crop_size]
    mean, std = _mean_and_std(config, cropped.dtype, cropped.device)
    return (cropped * scale - mean) / std


@lru_cache(maxsize=16)
@torch.inference_mode(False)  # as `_resize_plan`
def _mean_and_std(config: ImageProcessingConfig, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(config.image_mean, dtype=dtype, device=device).view(1, 3, 1, 1)
    return mean, torch.tensor(config.image_std, dtype=dtype, device=device).view(1, 3, 1, 1)



@dataclass
class PixelBatch:
    """Up to `batch_size` consecutive images of the input, ready for the model. `sources` and `errors` have one entry
    per image; `pixel_values` [n, 3, S, S] holds the images whose error is None, in order (None if there are none)."""

    sources: list[str | None]
    errors: list[str | None]
    pixel_values: torch.Tensor | None


def preprocessing_failure(source: str | None, error: Exception) -> str:
    """The error message of an image whose preprocessing raised `error` (e.g. out of memory on one huge image)."""
    return f"{source or 'image'}: preprocessing failed ({type(error).__name__}: {error})."


def default_workers() -> int:
    """Input threads when none are asked for: the CPUs this process may use, at most 8."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, available))


def in_order(function: Callable, items: Iterable, workers: int, ahead: int) -> Iterator:
    """`function(item)` for each item, in the items' order, computed on `workers` threads at most `ahead` items
    before the consumer takes them (one worker: in the calling thread, nothing ahead)."""
    if workers == 1:
        yield from map(function, items)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="artquant-input")
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # also when the consumer stops early: nothing keeps decoding for no one
        pool.shutdown(wait=True, cancel_futures=True)


def iter_pixel_batches(
    inputs: Any,
    config: ImageProcessingConfig,
    batch_size: int,
    layout: str = "auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    device: torch.device | str | None = None,
    workers: int | None = 1,
) -> Iterator[PixelBatch]:
    """The one path from user inputs to model batches: each image is decoded and preprocessed (on `device`) only
    when its batch is built, and its decoded pixels are dropped at once, so memory is bounded by one decoded image
    plus one batch of `pixel_values`, however many inputs there are. A bad image is an entry in `errors`, never an
    exception; the batches together have exactly one entry per input image, in order.

    `workers` > 1 (None: `default_workers()`) decodes and preprocesses that many images at a time on threads (PIL
    and torch release the GIL), up to one batch ahead of the consumer, so the next batch is made while the model
    runs; memory then holds about two batches. The batches are the same as with one worker. On a CUDA device the
    threads decode into pinned memory and each image goes to the GPU without blocking, to be preprocessed there.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}.")
    device = None if device is None else torch.device(device)
    on_cpu = device is None or device.type == "cpu"

    def prepare(load) -> tuple[str | None, str | None, torch.Tensor | None]:
        """(source, error, pixel_values on the CPU, or the decoded image for a device) of one image."""
        source, image = load()
        if isinstance(image, ImageInputError):
            return source, str(image), None
        try:
            if on_cpu:
                return source, None, config.pixel_values(image[None])
            return source, None, image.pin_memory() if device.type == "cuda" else image
        except Exception as error:  # noqa: BLE001 - e.g. out of memory on one huge image: that image fails
            return source, preprocessing_failure(source, error), None

    sources: list[str | None] = []
    errors: list[str | None] = []
    ready: list[torch.Tensor] = []
    for source, error, tensor in in_order(prepare, iter_image_loaders(inputs, layout, max_pixels), workers, batch_size):
        if error is None and not on_cpu:
            try:
                tensor = config.pixel_values(tensor.to(device, non_blocking=True)[None])
            except Exception as failed:  # noqa: BLE001 - as above, on the device
                error, tensor = preprocessing_failure(source, failed), None
        if error is None:
            ready.append(tensor)
        del tensor
        sources.append(source)
        errors.append(error)
        if len(sources) == batch_size:
            yield PixelBatch(sources, errors, config.collate(ready) if ready else None)
            sources, errors, ready = [], [], []
    if sources:
        yield PixelBatch(sources, errors, config.collate(ready) if ready else None)
