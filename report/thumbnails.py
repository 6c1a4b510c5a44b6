"""Thumbnails for a report: bounded JPEGs in `<report>/thumbs/`, named by a hash of the image's path and file
state, made once (a rerun over the same images writes nothing) and in parallel (Pillow decodes without the GIL)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

THUMBNAIL_FOLDER = "thumbs"


def thumbnail_name(image: Path) -> str | None:
    """`<hash>.jpg` for an existing file (path, size and modification time: a changed image gets a new thumbnail),
    None when there is no such file."""
    try:
        state = image.stat()
    except (OSError, ValueError):
        return None
    if not image.is_file():
        return None
    key = os.fsencode(image.absolute()) + b"\0%d\0%d" % (state.st_size, state.st_mtime_ns)
    return hashlib.sha1(key).hexdigest()[:20] + ".jpg"


def _write_thumbnail(image: Path, target: Path, size: int) -> str | None:
    """Writes one thumbnail; returns None, or why the image could not be read."""
    from PIL import Image, ImageOps

    try:
        with Image.open(image) as opened:
            opened.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster for large photos
            picture = opened
            ImageOps.exif_transpose(picture, in_place=True)  # shown as a viewer shows it; no copy
            picture.thumbnail((size, size), Image.Resampling.LANCZOS)
            if picture.mode in ("RGBA", "LA", "PA") or "transparency" in picture.info:
                picture = Image.alpha_composite(Image.new("RGBA", picture.size, "white"), picture.convert("RGBA"))
            partial = target.with_suffix(".part")  # a killed run never leaves a half thumbnail that looks done
            picture.convert("RGB").save(partial, "JPEG", quality=80, optimize=True)
            partial.replace(target)
    except Exception as bad:  # Pillow raises many types for unreadable files; each becomes a placeholder
        return f"{type(bad).__name__}: {bad}"
    return None


def make_thumbnails(
    images: Sequence[Path],
    report_folder: Path,
    size: int = 256,
    workers: int | None = None,
    progress: Callable[[int], object] | None = None,
) -> tuple[list[str | None], dict[Path, str]]:
    """Per image, its thumbnail's path relative to `report_folder` (None where there is nothing to show: a missing
    or unreadable file), and the read errors of the files that exist. Thumbnails already there are kept."""
    folder = report_folder / THUMBNAIL_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    names = [thumbnail_name(image) for image in images]
    todo = {name: image for name, image in zip(names, images) if name and not (folder / name).exists()}

    def write(item: tuple[str, Path]) -> str | None:
        error = _write_thumbnail(item[1], folder / item[0], size)
        if progress is not None:
            progress(1)
        return error

    errors: dict[Path, str] = {}
    unreadable = set()
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        for (name, image), error in zip(todo.items(), pool.map(write, todo.items())):
            if error is not None:
                errors[image] = error
                unreadable.add(name)
    return [None if n is None or n in unreadable else f"{THUMBNAIL_FOLDER}/{n}" for n in names], errors
