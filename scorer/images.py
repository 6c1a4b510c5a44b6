"""Turning what users pass (paths, PIL images, numpy arrays, torch or ComfyUI tensors) into RGB images.

Every image becomes a uint8 tensor [3, H, W], exactly what the reference's `Image.open(p).convert("RGB")` gives,
so that the same picture scores the same whichever form it arrives in. Failures are per image: `load_images`
returns an `ImageInputError` in place of each image it could not read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class ImageInputError(ValueError):
    """An input that is not a usable image; the message says what is wrong and what to do."""


def rgb_from_pil(image: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 [3, H, W] as the reference's `convert("RGB")` (alpha dropped, no EXIF rotation).

    16-bit grey images are scaled to 8 bits first (PIL's own conversion would clip them to white).
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.round(array * (255.0 / peak)).clip(0, 255).astype(np.uint8), mode="L")
    array = np.array(image.convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def read_image(path: str | os.PathLike) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise ImageInputError(f"{path}: no such file.")
    if path.stat().st_size == 0:
        raise ImageInputError(f"{path}: the file is empty (0 bytes).")
    try:
        with Image.open(path) as image:
            image.load()
            return rgb_from_pil(image)
    except UnidentifiedImageError:
        raise ImageInputError(f"{path}: not an image PIL can read (PNG, JPEG, WebP, ...).") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageInputError(f"{path}: the image is damaged or truncated ({error}).") from None


def _float_to_uint8(array: torch.Tensor, where: str) -> torch.Tensor:
    if not torch.isfinite(array).all():
        raise ImageInputError(f"{where}: the image contains NaN or infinite values.")
    low, high = float(array.min()), float(array.max())
    if low < -1e-3 or high > 1 + 1e-3:
        hint = " It looks like [-1, 1]: pass (x + 1) / 2." if low < 0 and low >= -1 - 1e-3 else ""
        hint = hint or (" It looks like [0, 255]: pass x / 255 or a uint8 tensor." if high <= 255 else "")
        raise ImageInputError(f"{where}: float images must be in [0, 1], got values in [{low:.3g}, {high:.3g}].{hint}")
    return (array.clamp(0, 1) * 255).round().to(torch.uint8)


def _to_three_channels(image: torch.Tensor, where: str) -> torch.Tensor:
    channels = image.shape[0]
    if channels == 1:
        return image.expand(3, -1, -1)
    if channels == 4:
        return image[:3]  # alpha dropped, as convert("RGB") does
    if channels == 3:
        return image
    raise ImageInputError(f"{where}: expected 1, 3 or 4 channels, got {channels}.")


def channels_first(tensor: torch.Tensor, layout: str, where: str) -> torch.Tensor:
    """[B, C, H, W] from a batch in `layout` "BCHW", "BHWC" (ComfyUI's IMAGE) or "auto"."""
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 4:
        raise ImageInputError(f"{where}: expected a [B, C, H, W] or [B, H, W, C] tensor, got shape {tuple(tensor.shape)}.")
    if layout == "auto":
        if tensor.shape[1] in (1, 3, 4):
            layout = "BCHW"
        elif tensor.shape[-1] in (1, 3, 4):
            layout = "BHWC"
        else:
            raise ImageInputError(
                f"{where}: cannot tell the channel axis of shape {tuple(tensor.shape)}; expected 1, 3 or 4 channels "
                "in dim 1 (BCHW) or last (BHWC, ComfyUI)."
            )
    if layout == "BHWC":
        return tensor.permute(0, 3, 1, 2)
    if layout != "BCHW":
        raise ValueError(f"layout must be 'auto', 'BCHW' or 'BHWC', not {layout!r}.")
    return tensor


def rgb_from_array(array: Any, layout: str = "auto", where: str = "image") -> list[torch.Tensor | ImageInputError]:
    """numpy HWC/HW or torch [B,]C,H,W / [B,]H,W,C, uint8 or float in [0, 1] -> uint8 [3, H, W] images.

    A problem with the whole array raises; a problem with one image of a batch (NaN, out of range) becomes that
    image's `ImageInputError`, so the others still count."""
    if isinstance(array, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if tensor.ndim == 2:
            tensor = tensor[None, None]
        elif tensor.ndim == 3 and layout == "auto":
            layout = "BHWC"  # numpy images are height x width x channels
    else:
        tensor = array.detach().cpu()
    if tensor.dtype == torch.uint16:
        tensor = (tensor.to(torch.float64) / 65535).float()
    if tensor.dtype == torch.bool or (not tensor.is_floating_point() and tensor.dtype != torch.uint8):
        raise ImageInputError(f"{where}: unsupported dtype {tensor.dtype}; use uint8 or float in [0, 1].")
    batch = channels_first(tensor, layout, where)
    if batch.shape[-1] == 0 or batch.shape[-2] == 0:
        raise ImageInputError(f"{where}: the image has no pixels (shape {tuple(batch.shape)}).")
    images = []
    for i, image in enumerate(batch):
        label = f"{where}[{i}]" if batch.shape[0] > 1 else where
        try:
            if image.is_floating_point():
                image = _float_to_uint8(image.float(), label)
            images.append(_to_three_channels(image, label).contiguous())
        except ImageInputError as error:
            images.append(error)
    return images


def load_images(inputs: Any, layout: str = "auto") -> list[torch.Tensor | ImageInputError]:
    """One entry per image: a uint8 [3, H, W] tensor, or the error that explains why it could not be used.

    `inputs`: a path, PIL image, numpy array, tensor (a batch counts as its images), or a list of these.
    """
    if isinstance(inputs, (str, os.PathLike, Image.Image, np.ndarray, torch.Tensor)):
        inputs = [inputs]
    results: list[torch.Tensor | ImageInputError] = []
    for index, item in enumerate(inputs):
        where = str(item) if isinstance(item, (str, os.PathLike)) else f"image {index}"
        try:
            if isinstance(item, (str, os.PathLike)):
                results.append(read_image(item))
            elif isinstance(item, Image.Image):
                results.append(rgb_from_pil(item))
            elif isinstance(item, (np.ndarray, torch.Tensor)):
                results.extend(rgb_from_array(item, layout, where))
            else:
                raise ImageInputError(f"{where}: unsupported input type {type(item).__name__}.")
        except ImageInputError as error:
            results.append(error)
    return results


def iter_image_files(paths: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """Files as given, folders recursed (sorted, image suffixes only)."""
    for path in map(Path, paths):
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield path
