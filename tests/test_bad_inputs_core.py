"""`score` and `describe` against bad inputs: one result per image, in order, a clear per-image error, never a raise.

Every row of the table names an input and the exact message fragment (or result) it must give.
"""

import math
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import artquant.scorer.images as images_module
import artquant.scorer.preprocessing as preprocessing_module
from artquant.scorer.images import DEFAULT_MAX_PIXELS

pytestmark = pytest.mark.usefixtures("one_thread")


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` but holds almost no data: what a decompression bomb's header looks like."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def good(reference_images):
    return reference_images[0]


def _lazily_opened_truncated(good, folder):
    data = good.read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    return Image.open(folder / "cut.png")  # header fine: fails only when PIL decodes it


def _closed(good):
    image = Image.open(good)
    image.load()
    image.close()
    return image


def _bad_inputs(good, folder):
    """(input, images it stands for, message fragment of each) for every kind of bad input."""
    (folder / "bomb.png").write_bytes(png_header(30_000, 30_000))
    (folder / "random.png").write_bytes(np.random.default_rng(0).bytes(300))
    os.mkfifo(folder / "pipe.png")
    (folder / "folder.png").mkdir()
    meta = torch.empty(2, 3, 8, 8, device="meta")
    return [
        (folder / "bomb.png", 1, "decompression-bomb check"),
        (_lazily_opened_truncated(good, folder), 1, "damaged or truncated"),
        (_closed(good), 1, "closed before scoring"),
        (Image.new("La", (8, 8)), 1, "cannot convert mode La to RGB"),
        (Image.new("RGB", (0, 7)), 1, "has no pixels (0 x 7)"),
        (meta, 2, "meta device"),
        (np.empty((2, 8, 8, 3), dtype=object), 2, "unsupported numpy dtype object"),
        (torch.zeros(3, 3, 8, 8, dtype=torch.bool), 3, "a bool tensor is a mask"),
        (torch.full((1, 3, 8, 8), 300, dtype=torch.int64), 1, "8-bit values 0..255, got values in [300, 300]"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.complex64), 1, "unsupported dtype torch.complex64"),
        (torch.zeros(1, 1, 1, 3, 8, 8), 1, "expected a [B, C, H, W] or [B, H, W, C] tensor"),
        (np.random.default_rng(1).bytes(100), 1, "not an image PIL can read"),
        (folder / "random.png", 1, "not an image PIL can read"),
        (folder / "pipe.png", 1, "not a regular file (a FIFO"),
        (folder / "folder.png", 1, "is a folder, not an image file"),
        (folder / "missing.png", 1, "no such file"),
        (b"", 1, "the image bytes are empty"),
        (None, 1, "unsupported input type NoneType"),
    ]


def test_each_bad_input_fails_alone_in_order_with_its_message(base_scorer, good, tmp_path):
    table = _bad_inputs(good, tmp_path)
    inputs, expected, sources = [], [], []
    for item, count, fragment in table:  # a good image after every bad one: each must still score, in its place
        inputs += [item, good]
        expected += [fragment] * count + [None]
        sources += [str(item) if isinstance(item, os.PathLike) else None] * count + [str(good)]
    results = base_scorer.score(inputs, batch_size=3)
    assert len(results) == len(expected)
    for result, fragment in zip(results, expected):
        if fragment is None:
            assert result.ok and result.source == str(good) and 1 <= result.score <= 10
        else:
            assert not result.ok and fragment in result.error and math.isnan(result.score)
    sources[2], sources[4] = str(tmp_path / "cut.png"), str(good)  # PIL images opened from files keep their names
    assert [r.source for r in results] == sources


def test_describe_keeps_every_image_in_order(base_scorer, good, tmp_path):
    texts = base_scorer.describe([good, torch.zeros(2, 3, 8, 8, dtype=torch.bool), b"junk", good], max_new_tokens=2)
    assert len(texts) == 5
    assert texts[1].startswith("[error: image 1[0]: a bool tensor is a mask")
    assert texts[2].startswith("[error: image 1[1]: a bool tensor is a mask")
    assert texts[3].startswith("[error: image 2: not an image PIL can read")
    assert texts[0] == texts[4] and not texts[0].startswith("[error")


def test_integer_images_follow_one_rule(base_scorer):
    """Integers are 8-bit values: an int64 batch of 4 gives 4 results, each as the same pixels in uint8 would."""
    pixels = torch.randint(0, 256, (4, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    pixels[2, 0, 0, 0] = -1
    results = base_scorer.score(pixels)
    assert [r.ok for r in results] == [True, True, False, True]
    assert "got values in [-1, 255]" in results[2].error
    as_uint8 = base_scorer.score(pixels[[0, 1, 3]].clamp(0, 255).to(torch.uint8))
    assert [r.score for r in results if r.ok] == pytest.approx([r.score for r in as_uint8], abs=1e-5)


def test_pixel_limit_is_a_per_image_error_read_from_the_header(base_scorer, tmp_path):
    (tmp_path / "big.png").write_bytes(png_header(200, 100))  # never decoded: the header is refused first
    small = Image.new("RGB", (100, 100), (90, 30, 200))
    results = base_scorer.score([tmp_path / "big.png", torch.rand(1, 3, 100, 101), small], max_pixels=10_000)
    assert "200 x 100 = 20,000 pixels is more than the limit of 10,000" in results[0].error
    assert "101 x 100 = 10,100 pixels is more than the limit of 10,000" in results[1].error
    assert results[2].ok
    assert DEFAULT_MAX_PIXELS == 2 * 89_478_485, "the default is PIL's own bomb limit (twice its warning limit)"


@pytest.mark.parametrize("declared, fragment", [(3000, "exceeds limit of 2000 pixels"), (1500, "exceeds limit of 1000 pixels")])
def test_pil_bomb_error_and_warning_as_error_are_per_image(base_scorer, tmp_path, monkeypatch, declared, fragment):
    """Over 2x PIL's limit PIL raises DecompressionBombError; over 1x it warns, which `-W error` makes a raise."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    (tmp_path / "bomb.png").write_bytes(png_header(declared, 1))
    good = tmp_path / "small.png"
    Image.new("RGB", (20, 20), (200, 100, 0)).save(good)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        results = base_scorer.score([tmp_path / "bomb.png", good, tmp_path / "bomb.png"])
    assert [r.ok for r in results] == [False, True, False], "and a rerun over the same file does not stop there"
    assert "refused by PIL's decompression-bomb check" in results[0].error and fragment in results[0].error


def test_nan_from_the_model_is_an_error_never_a_score(base_scorer, good, monkeypatch):
    real = base_scorer.level_logits

    def first_row_nan(pixel_values):
        logits = real(pixel_values).clone()
        logits[0] = float("nan")
        return logits

    monkeypatch.setattr(base_scorer, "level_logits", first_row_nan)
    results = base_scorer.score([good, good], batch_size=2)
    assert not results[0].ok and "non-finite (NaN or infinite) output" in results[0].error
    assert results[1].ok and math.isfinite(results[1].score)


def test_paths_are_decoded_one_batch_at_a_time(base_scorer, good, monkeypatch):
    """Decoding runs at most one batch ahead of the model (room for a prefetching pipeline), never the whole list."""
    events = []
    real_read, real_logits = images_module.read_image, base_scorer.level_logits
    monkeypatch.setattr(images_module, "read_image", lambda *a: events.append("read") or real_read(*a))
    monkeypatch.setattr(base_scorer, "level_logits", lambda pv: events.append("model") or real_logits(pv))
    base_scorer.score([good] * 10, batch_size=2)
    model_calls = [i for i, event in enumerate(events) if event == "model"]
    assert len(model_calls) == 5 and events.count("read") == 10
    for done, position in enumerate(model_calls):
        assert events[:position].count("read") <= 2 * (done + 2), f"batch {done} ran after too many decodes: {events}"

    consumed = []
    batches = base_scorer.score_batches((consumed.append(i) or good for i in range(100)), batch_size=3)
    assert len(next(batches)) == 3
    assert 3 <= len(consumed) <= 2 * 3 + 1 and consumed == list(range(len(consumed))), "a generator is read lazily"
    batches.close()


def test_banded_resize_is_still_pil_exact(monkeypatch):
    rng = np.random.default_rng(3)
    image = torch.from_numpy(rng.integers(0, 256, (97, 61, 3), dtype=np.uint8)).permute(2, 0, 1)[None]
    fill = torch.tensor([122.0, 116.0, 104.0], dtype=torch.float64)
    whole = preprocessing_module.pad_and_resize(image, 56, fill)
    as_float = preprocessing_module.pad_and_resize(image.double() / 255, 56, fill / 255)
    monkeypatch.setattr(preprocessing_module, "_BAND_ELEMENTS", 500)  # bands of 2 rows
    assert torch.equal(preprocessing_module.pad_and_resize(image, 56, fill), whole)
    banded_float = preprocessing_module.pad_and_resize(image.double() / 255, 56, fill / 255)
    assert torch.allclose(banded_float, as_float, atol=1e-12, rtol=0)


def test_scores_are_batch_independent_within_the_stated_tolerance(base_scorer, reference_images):
    """`score`'s docstring promises 1e-5 in float32 on the CPU: alone, in a batch, beside errors, at any position."""
    alone = [base_scorer.score(p)[0].score for p in reference_images[:3]]
    mixed = base_scorer.score([b"x", *reference_images[:3], None, reference_images[0]], batch_size=4)
    assert [r.score for r in mixed[1:4]] + [mixed[5].score] == pytest.approx([*alone, alone[0]], abs=1e-5)


# --- the property: whatever goes in, one result per image, in order, and no raise ------------------------------
MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "F",
         "I;16", "I;16B"]
DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.bool, torch.float16,
          torch.bfloat16, torch.float32, torch.float64, torch.complex64]

random_bytes = st.one_of(st.binary(max_size=64), st.binary(max_size=64).map(lambda b: b"\x89PNG\r\n\x1a\n" + b))
random_pil = st.builds(lambda mode, w, h: Image.new(mode, (w, h)), st.sampled_from(MODES),
                       st.integers(0, 24), st.integers(0, 24))


@st.composite
def random_tensors(draw):
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=5)))
    dtype = draw(st.sampled_from(DTYPES))
    if draw(st.booleans()):
        return torch.empty(shape, dtype=dtype, device="meta")
    values = torch.rand(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 9)))) * draw(
        st.sampled_from([1.0, 255.0, 2.0]))
    return values.to(dtype)


def _images_in(item) -> int:
    return item.shape[0] if isinstance(item, torch.Tensor) and item.ndim == 4 else 1


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(items=st.lists(st.one_of(random_bytes, random_pil, random_tensors()), min_size=1, max_size=3))
def test_any_input_gives_one_result_per_image_in_order(base_scorer, good, items):
    inputs, marks = [], []
    for item in items:  # a known file after each random item pins down where each item's results are
        inputs += [item, good]
        marks.append(sum(_images_in(x) for x in inputs) - 1)
    results = base_scorer.score(inputs, batch_size=4)
    assert len(results) == sum(_images_in(x) for x in inputs)
    assert all(results[m].source == str(good) and results[m].ok for m in marks)
    for result in results:
        assert result.ok == (result.error is None)
        assert (1 <= result.score <= 10) if result.ok else (math.isnan(result.score) and result.error)
