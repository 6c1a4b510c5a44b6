"""Turning what users pass (paths, encoded bytes, PIL images, numpy arrays, torch or ComfyUI tensors) into RGB images.

Every image becomes a uint8 tensor [3, H, W], exactly what the reference's `Image.open(p).convert("RGB")` gives,
so that the same picture scores the same whichever form it arrives in. Failures are per image: `iter_images` and
`load_images` give an `ImageInputError` in place of each image that cannot be used, and never raise for a bad item.

How many images an input counts as: a 4-D array or tensor counts as its first dimension (a batch), anything else as
one. So the number of results always equals the number of images, whatever is wrong with them.
"""

from __future__ import annotations

import functools
import io
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

# PIL's own hard limit (twice Image.MAX_IMAGE_PIXELS): about 13400 x 13400. A 100-megapixel photo passes; a
# decompression bomb is refused from its header, before any pixel is decoded.
DEFAULT_MAX_PIXELS = 2 * 89_478_485

_BAND_BYTES = 1 << 24  # PIL -> tensor copies go through row bands of about this size, never a whole-image bytes copy


class ImageInputError(ValueError):
    """An input that is not a usable image; the message says what is wrong and what to do."""


def _check_pixels(width: int, height: int, max_pixels: int, where: str) -> None:
    if width * height == 0:
        raise ImageInputError(f"{where}: the image has no pixels ({width} x {height}).")
    if width * height > max_pixels:
        raise ImageInputError(
            f"{where}: {width} x {height} = {width * height:,} pixels is more than the limit of {max_pixels:,}; "
            "downscale it, or raise max_pixels (--max-pixels) if the file is trusted."
        )


def _rgb_pil(image: Image.Image) -> Image.Image:
    """The image in mode RGB, as the reference's `convert("RGB")`, with 16-bit grey scaled (PIL would clip it)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.round(array * (255.0 / peak)).clip(0, 255).astype(np.uint8), mode="L")
    return image if image.mode == "RGB" else image.convert("RGB")


def rgb_from_pil(image: Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS, where: str = "image") -> torch.Tensor:
    """PIL image -> uint8 [3, H, W] as the reference's `convert("RGB")` (alpha dropped, no EXIF rotation).

    The result is a channels-last view (strides of an H x W x 3 array): the pixels are copied once, in row bands,
    so a large image costs its decoded size plus one uint8 copy, not several.
    """
    width, height = image.size
    _check_pixels(width, height, max_pixels, where)
    try:
        image.load()  # a lazily opened image decodes here: its failures are this image's
        rgb = _rgb_pil(image)
    except ValueError as error:
        if "closed" in str(error):
            raise ImageInputError(f"{where}: the PIL image was closed before scoring; score it before closing it, "
                                  "or open it again.") from None
        raise ImageInputError(f"{where}: PIL cannot convert mode {image.mode} to RGB ({error}); convert it first.") from None
    except (OSError, SyntaxError, EOFError) as error:
        raise ImageInputError(f"{where}: PIL could not decode the image; the file is damaged or truncated ({error}).") from None
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    band = max(1, _BAND_BYTES // max(1, 3 * width))
    for top in range(0, height, band):
        bottom = min(top + band, height)
        pixels[top:bottom] = np.asarray(rgb.crop((0, top, width, bottom)))
    return torch.from_numpy(pixels).permute(2, 0, 1)


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """An image file -> uint8 [3, H, W]; `ImageInputError` saying what is wrong otherwise. Never opens a FIFO or
    device (it could block forever), and checks the size in the header before decoding."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ImageInputError(f"{path}: no such file.") from None
    except OSError as error:
        raise ImageInputError(f"{path}: cannot be read ({error.strerror or error}).") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageInputError(f"{path}: is a folder, not an image file; pass the folder itself to score the images in it.")
    if not stat.S_ISREG(info.st_mode):
        raise ImageInputError(f"{path}: is not a regular file (a FIFO, socket or device), so it is not read; "
                              "pass an image file.")
    if info.st_size == 0:
        raise ImageInputError(f"{path}: the file is empty (0 bytes).")
    try:
        with Image.open(path) as image:
            return rgb_from_pil(image, max_pixels, str(path))
    except OSError as error:
        raise ImageInputError(_decode_failure(str(path), error)) from None


def _decode_failure(where: str, error: Exception) -> str:
    if isinstance(error, UnidentifiedImageError):
        return f"{where}: not an image PIL can read (PNG, JPEG, WebP, ...)."
    if isinstance(error, PermissionError):
        return f"{where}: cannot be read (permission denied)."
    return f"{where}: the image is damaged or truncated ({error})."


def _decode_bytes(data: bytes, max_pixels: int, where: str) -> torch.Tensor:
    if not data:
        raise ImageInputError(f"{where}: the image bytes are empty.")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return rgb_from_pil(image, max_pixels, where)
    except OSError as error:
        raise ImageInputError(_decode_failure(where, error)) from None


def _float_to_uint8(image: torch.Tensor, where: str) -> torch.Tensor:
    if not torch.isfinite(image).all():
        raise ImageInputError(f"{where}: the image contains NaN or infinite values.")
    low, high = float(image.min()), float(image.max())
    if low < -1e-3 or high > 1 + 1e-3:
        hint = " It looks like [-1, 1]: pass (x + 1) / 2." if low < 0 and low >= -1 - 1e-3 else ""
        hint = hint or (" It looks like [0, 255]: pass x / 255 or a uint8 tensor." if high <= 255 else "")
        raise ImageInputError(f"{where}: float images must be in [0, 1], got values in [{low:.3g}, {high:.3g}].{hint}")
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def _to_uint8(image: torch.Tensor, where: str) -> torch.Tensor:
    """One image of any supported dtype -> uint8. The rule: uint8 as is; uint16 is 16-bit (scaled by 255/65535);
    other integers must hold 8-bit values 0..255; floats must be in [0, 1]; bool and complex are refused."""
    if image.dtype == torch.uint8:
        return image
    if image.dtype == torch.bool:
        raise ImageInputError(f"{where}: a bool tensor is a mask, not an image; pass uint8 (mask * 255) or float in [0, 1].")
    if image.dtype == torch.uint16:
        return _float_to_uint8(image.to(torch.float64) / 65535, where)
    if image.is_floating_point():
        return _float_to_uint8(image.float(), where)
    if image.is_complex():
        raise ImageInputError(f"{where}: unsupported dtype {image.dtype}; use uint8 or float in [0, 1].")
    wide = image.to(torch.int64)
    low, high = int(wide.min()), int(wide.max())
    if low < 0 or high > 255:
        raise ImageInputError(f"{where}: integer images must hold 8-bit values 0..255, got values in [{low}, {high}]; "
                              "pass uint8, or float in [0, 1].")
    return wide.to(torch.uint8)


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
    """[B, C, H, W] from a batch in `layout` "BCHW", "BHWC" (ComfyUI's IMAGE) or "auto" (a view, no copy)."""
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


def image_count(item: Any) -> int:
    """How many images `item` stands for: a 4-D array/tensor its first dimension, anything else 1."""
    shape = getattr(item, "shape", None) if isinstance(item, (np.ndarray, torch.Tensor)) else None
    return int(shape[0]) if shape is not None and len(shape) == 4 else 1


def _array_batch(array: np.ndarray | torch.Tensor, layout: str, where: str) -> torch.Tensor:
    """The whole array as a [B, C, H, W] view on the CPU side of things, or the one error that concerns all of it."""
    if isinstance(array, np.ndarray):
        if array.dtype.kind not in "biuf":
            raise ImageInputError(f"{where}: unsupported numpy dtype {array.dtype}; use uint8 or float in [0, 1].")
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("=")))
        if tensor.ndim == 2:
            tensor = tensor[None, None]
        elif tensor.ndim == 3 and layout == "auto":
            layout = "BHWC"  # numpy images are height x width x channels
    else:
        tensor = array.detach()
        if tensor.device.type == "meta":
            raise ImageInputError(f"{where}: the tensor is on the meta device and holds no pixels; "
                                  "materialise it (e.g. on cpu or cuda) before scoring.")
    batch = channels_first(tensor, layout, where)
    if batch.shape[-1] == 0 or batch.shape[-2] == 0:
        raise ImageInputError(f"{where}: the image has no pixels (shape {tuple(batch.shape)}).")
    return batch


def _array_images(array: np.ndarray | torch.Tensor, layout: str, where: str, max_pixels: int) -> Iterator:
    count = image_count(array)
    try:
        batch = _array_batch(array, layout, where)
    except ImageInputError as error:
        yield from ((None, error) for _ in range(count))
        return
    for i in range(count):
        label = f"{where}[{i}]" if count > 1 else where
        try:
            image = batch[i]
            _check_pixels(image.shape[-1], image.shape[-2], max_pixels, label)
            yield None, _to_three_channels(_to_uint8(image.cpu(), label), label)
        except ImageInputError as error:
            yield None, error
        except Exception as error:  # noqa: BLE001 - whatever breaks on one image stays with that image
            yield None, ImageInputError(f"{label}: could not be read ({type(error).__name__}: {error}).")


def _one_image(item: Any, max_pixels: int, where: str) -> torch.Tensor:
    if isinstance(item, (str, os.PathLike)):
        return read_image(item, max_pixels)
    if isinstance(item, Image.Image):
        return rgb_from_pil(item, max_pixels, where)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(item), max_pixels, where)
    raise ImageInputError(f"{where}: unsupported input type {type(item).__name__}; pass a path, image bytes, a PIL "
                          "image, a numpy array or a torch tensor.")


def _source(item: Any) -> str | None:
    if isinstance(item, (str, os.PathLike)):
        return os.fsdecode(item)
    if isinstance(item, Image.Image):
        return getattr(item, "filename", None) or None
    return None


def iter_images(
    inputs: Any, layout: str = "auto", max_pixels: int = DEFAULT_MAX_PIXELS
) -> Iterator[tuple[str | None, torch.Tensor | ImageInputError]]:
    """(source, image) for each image, decoded only when reached: `image` is uint8 [3, H, W] or the
    `ImageInputError` that explains why it cannot be used; `source` is the file name where there is one.

    `inputs`: a path, image bytes, PIL image, numpy array, tensor (a 4-D one counts as its images), or an iterable
    of these. Nothing about one item, however broken, raises or changes the others.
    """
    return (load() for load in iter_image_loaders(inputs, layout, max_pixels))


def iter_image_loaders(
    inputs: Any, layout: str = "auto", max_pixels: int = DEFAULT_MAX_PIXELS
) -> Iterator[Callable[[], tuple[str | None, torch.Tensor | ImageInputError]]]:
    """`iter_images` with each decode deferred: one call per image, in order, each returning what `iter_images`
    yields for it. Files, bytes and PIL images decode inside the call, so calls may run on worker threads (PIL
    releases the GIL while decoding); arrays are converted here, as they are enumerated."""
    if layout not in ("auto", "BCHW", "BHWC"):
        raise ValueError(f"layout must be 'auto', 'BCHW' or 'BHWC', not {layout!r}.")
    single = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray, torch.Tensor)
    if isinstance(inputs, single) or not isinstance(inputs, Iterable):
        inputs = [inputs]
    for index, item in enumerate(inputs):
        where = _source(item) if isinstance(item, (str, os.PathLike)) else f"image {index}"
        if isinstance(item, (np.ndarray, torch.Tensor)):
            for converted in _array_images(item, layout, where, max_pixels):
                yield lambda converted=converted: converted
            continue
        yield functools.partial(load_image_or_error, item, max_pixels, where)


def load_image_or_error(item: Any, max_pixels: int, where: str) -> tuple[str | None, torch.Tensor | ImageInputError]:
    """(source, uint8 [3, H, W]) for one path, bytes or PIL image, or (source, the error that explains why not); never raises."""
    try:
        return _source(item), _one_image(item, max_pixels, where)
    except ImageInputError as error:
        return _source(item), error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return _source(item), ImageInputError(
            f"{where}: refused by PIL's decompression-bomb check ({error}); if the file is trusted, raise "
            "PIL.Image.MAX_IMAGE_PIXELS and max_pixels (--max-pixels).")
    except Exception as error:  # noqa: BLE001 - whatever breaks on one image stays with that image
        return _source(item), ImageInputError(f"{where}: could not be read ({type(error).__name__}: {error}).")


def load_images(
    inputs: Any, layout: str = "auto", max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[torch.Tensor | ImageInputError]:
    """All of `iter_images` at once (decodes everything: prefer `iter_images` for long lists)."""
    return [image for _, image in iter_images(inputs, layout, max_pixels)]


def iter_image_files(
    paths: Iterable[str | os.PathLike], on_error: Callable[[Path, OSError], None] | None = None
) -> Iterator[Path]:
    """Files as given, folders recursed (sorted, image suffixes only; symlinked folders are not followed, so a loop
    cannot recurse forever). A folder that cannot be listed is passed to `on_error(folder, error)`; without
    `on_error` it raises `ImageInputError`, never skipped in silence."""

    def report(error: OSError) -> None:
        folder = Path(error.filename) if error.filename is not None else Path("?")
        if on_error is None:
            raise ImageInputError(f"{folder}: cannot list the folder ({error.strerror or error}).")
        on_error(folder, error)

    for path in map(Path, paths):
        if not path.is_dir():
            yield path
            continue
        found = []
        for folder, folders, files in os.walk(path, onerror=report):
            folders.sort()
            found += [Path(folder, name) for name in files if Path(name).suffix.lower() in IMAGE_SUFFIXES]
        yield from sorted(found)
