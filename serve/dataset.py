"""Dataset scoring on Ray Data: image folders, Parquet with image bytes, WebDataset tars, Hugging Face datasets.

Pipeline: sources -> rows (key, encoded image, error) -> decode and preprocess to the model's `pixel_values` on CPU
tasks (each row's as safetensors bytes: a fixed-size tensor for mPLUG-Owl2, patches of its own count and their grid
for Qwen-VL) -> score on model actors (one per GPU, one on the CPU when there is none) -> Parquet files written as
batches finish. The output is a folder of Parquet files; a rerun reads the keys already there and skips them, and
deletes a file a kill left half-written, so a killed run loses at most the batches in flight and no key is written
twice.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from .cluster import start_ray


ROWS = pa.schema([("key", pa.string()), ("image", pa.binary()), ("error", pa.string())])
KEY_COLUMNS = ("key", "__key__", "id", "path", "file_name")  # img2dataset, WebDataset, common Hugging Face names
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes", "bytes")
HF_PREFIX = "hf:"


class DatasetSourceError(ValueError):
    """A source that cannot be scored as given; the message says what to pass instead."""


# ----------------------------------------------------------------------------------------------------------------
# Sources -> rows of (key, encoded image, error)
# ----------------------------------------------------------------------------------------------------------------
def _sorted_files(sources: Iterable[Any]) -> tuple[list[str], list[str], list[str], list[Any]]:
    """(image files, Parquet files, tar shards, Hugging Face datasets), folders recursed and sorted."""
    from ..scorer.images import IMAGE_SUFFIXES  # here, not at the top: Ray's reading tasks need no torch

    images, parquets, tars, hf = [], [], [], []
    for source in sources:
        if not isinstance(source, (str, os.PathLike)):
            hf.append(source)
            continue
        if str(source).startswith(HF_PREFIX):
            hf.append(_load_hf_dataset(str(source)[len(HF_PREFIX):]))
            continue
        path = Path(source)
        if not path.exists():
            raise DatasetSourceError(f"{source}: no such file or folder.")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            suffix = file.suffix.lower()
            if suffix == ".parquet":
                parquets.append(str(file))
            elif suffix == ".tar":
                tars.append(str(file))
            elif suffix in IMAGE_SUFFIXES:
                images.append(str(file))
            elif not path.is_dir():
                raise DatasetSourceError(
                    f"{source}: not an image, a .parquet file or a .tar WebDataset shard (or a folder of them)."
                )
    return images, parquets, tars, hf


def _load_hf_dataset(location: str):
    try:
        import datasets
    except ImportError:
        raise DatasetSourceError(f"hf:{location} needs the `datasets` package: pip install datasets") from None
    loaded = datasets.load_from_disk(location)
    if isinstance(loaded, datasets.DatasetDict):
        raise DatasetSourceError(f"hf:{location} holds splits {list(loaded)}: pass one split's folder.")
    return loaded


def _pick(names: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, where: str) -> str:
    if wanted is not None:
        if wanted not in names:
            raise DatasetSourceError(f"{where} has no column {wanted!r} (it has {', '.join(names)}).")
        return wanted
    found = next((name for name in candidates if name in names), None)
    if found is None:
        option = "--image-column" if what == "image" else "--key-column"
        raise DatasetSourceError(f"{where} has no {what} column among {', '.join(names)}: name it with {option}.")
    return found


def _image_bytes(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Encoded bytes from a binary column or a Hugging Face Image struct {bytes, path}."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_struct(column.type):
        column = column.field("bytes")
    return column.cast(pa.binary())


def _rows_from_table(batch: pa.Table, key_column: str, image_column: str | None) -> pa.Table:
    keys = batch.column(key_column).cast(pa.string())
    if image_column is None or image_column not in batch.column_names:
        images = pa.nulls(len(batch), pa.binary())
    else:
        images = _image_bytes(batch.column(image_column))
    errors = [None if image is not None else f"no image in column {image_column!r}" for image in images.to_pylist()]
    return pa.table([keys, images, pa.array(errors, pa.string())], schema=ROWS)


def _webdataset_rows(batch: pa.Table) -> pa.Table:
    """A WebDataset sample's image is whichever of its files has an image suffix (img2dataset writes .jpg)."""
    names = [name for name in IMAGE_COLUMNS[1:5] if name in batch.column_names]
    images = [None] * len(batch)
    for name in names:
        # A sample without this suffix holds null (or NaN, from the pandas frames the reader builds) here.
        images = [old if old is not None or not isinstance(new, bytes) else new for old, new in zip(images, batch.column(name).to_pylist())]
    errors = [None if image is not None else "no .jpg/.jpeg/.png/.webp file in this sample" for image in images]
    return pa.table([batch.column("__key__").cast(pa.string()), pa.array(images, pa.binary()), pa.array(errors, pa.string())], schema=ROWS)


def _read_files(batch: pa.Table) -> pa.Table:
    """Image files are read inside the tasks (not in the driver); an unreadable file becomes its row's error."""
    images, errors = [], []
    for key in batch.column("key").to_pylist():
        try:
            images.append(Path(key).read_bytes())
            errors.append(None)
        except OSError as error:
            images.append(None)
            errors.append(f"{key}: cannot read the file ({error.strerror or error}).")
    return pa.table([batch.column("key"), pa.array(images, pa.binary()), pa.array(errors, pa.string())], schema=ROWS)


def _drop_done(batch: pa.Table, done: frozenset) -> pa.Table:
    keep = [key not in done for key in batch.column("key").to_pylist()]
    return batch.filter(pa.array(keep, pa.bool_()))


def plan_sources(sources: Iterable[Any], image_column: str | None = None, key_column: str | None = None) -> dict:
    """Sorts the sources by kind and finds the key and image columns; every problem is raised here, before Ray."""
    image_files, parquets, tars, hf_datasets = _sorted_files(sources)
    plan = {"image_files": image_files, "tars": tars, "parquets": [], "hf": []}
    for path in parquets:
        names = pq.read_schema(path).names
        plan["parquets"].append((path, _pick(names, key_column, KEY_COLUMNS, "key", path), _pick(names, image_column, IMAGE_COLUMNS, "image", path)))
    for index, dataset in enumerate(hf_datasets):
        names, where = list(dataset.column_names), f"Hugging Face dataset {index}"
        plan["hf"].append((dataset, _pick(names, key_column, KEY_COLUMNS, "key", where), _pick(names, image_column, IMAGE_COLUMNS, "image", where)))
    return plan


def source_rows(plan: dict, done: frozenset = frozenset(), batch_size: int = 16):
    """One Ray Dataset of (key, image bytes, error) over all planned sources, without the keys in `done`."""
    keyed = []  # sources whose keys are known only once read: filtered against `done` after reading
    for path, key, image in plan["parquets"]:
        dataset = ray.data.read_parquet(path, columns=sorted({key, image}))
        keyed.append(dataset.map_batches(_rows_from_table, batch_format="pyarrow", fn_args=(key, image)))
    if plan["tars"]:
        keyed.append(ray.data.read_webdataset(plan["tars"], decoder=None).map_batches(_webdataset_rows, batch_format="pyarrow"))
    for dataset, key, image in plan["hf"]:
        undecoded = dataset.select_columns(sorted({key, image})).cast_column(image, type(dataset.features[image])(decode=False))
        rows = ray.data.from_huggingface(undecoded)
        keyed.append(rows.map_batches(_rows_from_table, batch_format="pyarrow", fn_args=(key, image)))
    if done:
        keyed = [part.map_batches(_drop_done, batch_format="pyarrow", fn_args=(done,)) for part in keyed]
    todo = [path for path in plan["image_files"] if path not in done]
    files = []
    if todo:  # a read task per batch-sized block, not per file
        listing = ray.data.from_items([{"key": path} for path in todo], override_num_blocks=math.ceil(len(todo) / batch_size))
        files.append(listing.map_batches(_read_files, batch_format="pyarrow"))
    parts = files + keyed
    if not parts:
        return None
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


# ----------------------------------------------------------------------------------------------------------------
# Decode and preprocess on CPU tasks, score on model actors
# ----------------------------------------------------------------------------------------------------------------
def _errors(column) -> list[str | None]:
    """A batch's error column as messages or None (an all-null column reaches numpy as NaNs)."""
    return [value if isinstance(value, str) else None for value in column]


def _pixel_tensors(pixel_values) -> dict:
    """One image's `pixel_values` as named tensors: the tensor itself (mPLUG-Owl2), or the fields of a dataclass of
    tensors (Qwen-VL's patches and patch grid)."""
    if dataclasses.is_dataclass(pixel_values):
        return {field.name: getattr(pixel_values, field.name).contiguous()
                for field in dataclasses.fields(pixel_values)}
    return {"pixel_values": pixel_values.contiguous()}


def _pixel_values(tensors: dict, like):
    """`_pixel_tensors` undone, for pixel values of the kind `like` is."""
    return type(like)(**tensors) if dataclasses.is_dataclass(like) else tensors["pixel_values"]


def preprocess_rows(batch: dict, image_config, max_pixels: int | None = None) -> dict:
    """Encoded bytes -> each image's `pixel_values` (`image_config.pixel_values`), on CPU workers, stored as
    safetensors bytes (any shape, no pickle, bit-exact); failures become errors, with null pixel values.

    Decoded by the core's own per-image loader, so an image over `max_pixels` (checked from its header, before any
    pixel is decoded) or one PIL cannot read gets the same error message as in `artquant score`, and preprocessed by
    the checkpoint's `image_config`, bit for bit as in `artquant score`."""
    from safetensors.torch import save

    from ..scorer.images import DEFAULT_MAX_PIXELS, load_image_or_error
    from ..scorer.preprocessing import preprocessing_failure

    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    pixels: list[bytes | None] = [None] * len(batch["key"])
    errors = _errors(batch["error"])
    for i, (key, data) in enumerate(zip(batch["key"], batch["image"])):
        if errors[i] is not None:
            continue
        _, loaded = load_image_or_error(data, limit, key)
        if isinstance(loaded, Exception):
            errors[i] = str(loaded)
            continue
        try:
            pixels[i] = save(_pixel_tensors(image_config.pixel_values(loaded[None])))
        except Exception as error:  # noqa: BLE001 - as in the core: whatever breaks on one image stays with it
            errors[i] = preprocessing_failure(key, error)
    return {"key": batch["key"], "pixel_values": np.array(pixels, dtype=object),
            "error": np.array(errors, dtype=object)}


class ScoringActor:
    """Holds one scorer (on its GPU, or the CPU) for the actor's lifetime; scores the `pixel_values` it is given."""

    def __init__(self, scorer_options: dict):
        from ..scorer import ArtQuantScorer

        self.hold(ArtQuantScorer.from_pretrained(**scorer_options))

    def hold(self, scorer) -> None:
        """Scores with `scorer` from now on (the constructor loads one; tests hand one in)."""
        import torch

        self.scorer = scorer
        # The kind of pixel values this checkpoint takes (a tensor, or a dataclass of tensors), to rebuild rows as.
        self.pixel_kind = scorer.image_config.pixel_values(torch.zeros(1, 3, 1, 1, dtype=torch.uint8))

    def __call__(self, batch: dict) -> dict:
        from safetensors.torch import load

        from ..scorer.preprocessing import PixelBatch

        keys, errors = [str(key) for key in batch["key"]], _errors(batch["error"])
        parts = [_pixel_values(load(batch["pixel_values"][i]), self.pixel_kind)
                 for i, error in enumerate(errors) if error is None]
        # The core's own collation: a batch exactly as `artquant score` builds it from the same images.
        pixel_values = self.scorer.image_config.collate(parts) if parts else None
        # The core's own batch scoring: errors kept per row, a non-finite output an error row, never a score.
        results = self.scorer.score_pixel_batch(PixelBatch(keys, errors, pixel_values))
        names = self.scorer.preset.level_names
        columns = {"key": pa.array(keys, pa.string()), "score": np.array([r.score for r in results], np.float64),
                   "std": np.array([r.std for r in results], np.float64)}
        columns.update({f"p_{name}": np.array([r.level_probs[name] for r in results], np.float64) for name in names})
        columns["error"] = pa.array([r.error for r in results], pa.string())  # typed: a file of only successes reads with the rest
        return pa.table(columns)


# ----------------------------------------------------------------------------------------------------------------
# Output folder: keys already written, half-written files from a kill
# ----------------------------------------------------------------------------------------------------------------
def written_keys(out: str | os.PathLike) -> tuple[set[str], list[Path]]:
    """Keys in the complete Parquet files under `out`, and the unreadable (half-written) files found there."""
    keys, broken = set(), []
    folder = Path(out)
    if not folder.is_dir():
        return keys, broken
    for file in sorted(folder.glob("*.parquet")):
        try:
            keys.update(pq.read_table(file, columns=["key"]).column("key").to_pylist())
        except (pa.ArrowInvalid, OSError):
            broken.append(file)
    return keys, broken


def score_dataset(
    sources: Any,
    out: str | os.PathLike,
    *,
    model: str | None = None,
    base: str | None = None,
    preset: str = "artquant",
    dtype: str = "auto",
    batch_size: int = 16,
    actors: int | None = None,
    image_column: str | None = None,
    key_column: str | None = None,
    rows_per_file: int | None = None,
    max_pixels: int | None = None,
) -> dict:
    """Scores every image of `sources` into Parquet files under the folder `out`; returns counts.

    `sources`: paths (image files, folders, `.parquet` files with an image-bytes column, `.tar` WebDataset
    shards), `hf:<folder>` of a `datasets.save_to_disk`, or `datasets.Dataset` objects. Keys: the image path,
    else the key column (`key`, `__key__`, `id`, `path`, ...). Output columns: key, score, std, p_<level>, error.
    `actors`: model actors (default: one per GPU, each holding one; one CPU actor when there is no GPU).
    `rows_per_file`: gather rows into fewer, larger files (default: one file per batch; a kill loses what is
    not yet in a file). A rerun with the same `out` skips the keys already written.
    `max_pixels`: per-image pixel limit (default: the core's `DEFAULT_MAX_PIXELS`, as `artquant score`); an image
    over it becomes a row with `error` set, and the others still score.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1.")
    if max_pixels is not None and max_pixels < 1:
        raise ValueError("max_pixels must be at least 1.")
    if isinstance(sources, (str, os.PathLike)) or not isinstance(sources, (list, tuple)):
        sources = [sources]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DatasetSourceError(f"{out} is a file; --out names a folder of Parquet files (it is created).")
    plan = plan_sources(sources, image_column, key_column)
    from ..scorer import ArtQuantScorer  # the checkpoint's preprocessing, read here without loading the model

    image_config = ArtQuantScorer.load_image_config(model, base, preset)  # a bad checkpoint is refused before Ray
    done, broken = written_keys(out)
    for file in broken:  # written by a killed run: its rows are scored again
        file.unlink()
    start_ray()
    rows = source_rows(plan, frozenset(done), batch_size)
    summary = {"already_done": len(done), "removed_partial_files": len(broken), "scored": 0, "failed": 0}
    if rows is None:
        return summary
    gpus = int(ray.cluster_resources().get("GPU", 0))
    scorer_options = {"model": model, "base": base, "preset": preset, "dtype": dtype}
    # Blocks of one batch each: every finished batch is written as its own file, so a kill loses only those in flight.
    rows = rows.repartition(target_num_rows_per_block=batch_size)
    scored = rows.map_batches(
        preprocess_rows, batch_size=batch_size, batch_format="numpy",
        fn_kwargs={"image_config": image_config, "max_pixels": max_pixels},
    ).map_batches(
        ScoringActor,
        fn_constructor_args=(scorer_options,),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors or max(gpus, 1)),
        num_gpus=1 if gpus else 0,
    )
    scored.write_parquet(str(out), min_rows_per_file=rows_per_file)
    keys, _ = written_keys(out)
    errors = pq.read_table(out, columns=["key", "error"]).to_pydict() if keys else {"key": [], "error": []}
    new = [e for k, e in zip(errors["key"], errors["error"]) if k not in done]
    summary.update(scored=sum(e is None for e in new), failed=sum(e is not None for e in new))
    return summary
