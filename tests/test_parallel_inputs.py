"""The parallel input pipeline: worker threads give exactly what one thread gives (order, errors, values).

Exact equality is right here: every image goes through the same operations on the same data whichever thread runs
them, and the model then sees the same batches.
"""

import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from artquant.scorer.preprocessing import in_order, iter_pixel_batches


@pytest.fixture(scope="module")
def mixed_inputs(reference_images, tmp_path_factory):
    """Every kind of input, good and bad, interleaved."""
    folder = tmp_path_factory.mktemp("mixed")
    (folder / "broken.png").write_bytes(b"not an image")
    jpeg = io.BytesIO()
    Image.open(reference_images[1]).convert("RGB").save(jpeg, "JPEG", quality=90)
    rng = np.random.default_rng(0)
    nan_image = torch.rand(3, 20, 30)
    nan_image[0, 0, 0] = float("nan")
    return [
        reference_images[0],
        folder / "broken.png",
        jpeg.getvalue(),
        str(reference_images[2]),
        folder / "missing.png",
        Image.open(reference_images[3]),
        rng.integers(0, 256, (33, 47, 3), dtype=np.uint8),
        torch.rand(2, 3, 40, 24),  # a batch: two images
        nan_image,
        b"",
        reference_images[4],
        reference_images[5],
    ]


def batches_of(inputs, config, workers, batch_size=4):
    return list(iter_pixel_batches(inputs, config, batch_size, workers=workers))


@pytest.mark.parametrize("workers", [2, 5])
def test_parallel_batches_equal_the_sequential_ones(base_scorer, mixed_inputs, workers):
    sequential = batches_of(mixed_inputs, base_scorer.image_config, workers=1)
    parallel = batches_of(mixed_inputs, base_scorer.image_config, workers=workers)
    assert sum(len(b.sources) for b in sequential) == 13
    assert sum(e is not None for b in sequential for e in b.errors) == 4, "broken, missing, NaN and empty bytes"
    assert len(parallel) == len(sequential)
    for ours, expected in zip(parallel, sequential):
        assert ours.sources == expected.sources
        assert ours.errors == expected.errors
        assert torch.equal(ours.pixel_values, expected.pixel_values)


def test_parallel_scores_equal_the_sequential_ones(base_scorer, mixed_inputs):
    sequential = base_scorer.score(mixed_inputs, batch_size=3, workers=1)
    parallel = base_scorer.score(mixed_inputs, batch_size=3, workers=4)
    assert [r.source for r in parallel] == [r.source for r in sequential]
    assert [r.error for r in parallel] == [r.error for r in sequential]
    ok = [(ours.score, expected.score) for ours, expected in zip(parallel, sequential) if expected.ok]
    assert len(ok) == 9 and all(ours == expected for ours, expected in ok)


def test_describe_with_workers_equals_one_thread(base_scorer, reference_images):
    inputs = [reference_images[0], b"garbage", reference_images[1]]
    assert base_scorer.describe(inputs, max_new_tokens=3, workers=3) == base_scorer.describe(inputs, max_new_tokens=3, workers=1)


def test_in_order_keeps_order_and_stays_bounded():
    started, taken = [], []
    lock = threading.Lock()

    def slow_first(index):
        with lock:
            started.append(index)
            assert len(started) - len(taken) <= 3 + 1, "at most `ahead` items beyond the one being taken"
        time.sleep(0.02 if index % 3 == 0 else 0.0)  # later items often finish first
        return index * 10

    for value in in_order(slow_first, range(20), workers=4, ahead=3):
        taken.append(value)
    assert taken == [i * 10 for i in range(20)]


def test_stopping_early_leaves_no_worker_running(base_scorer, reference_images):
    before = {t for t in threading.enumerate() if t.name.startswith("artquant-input")}
    batches = iter_pixel_batches(reference_images * 4, base_scorer.image_config, 2, workers=3)
    next(batches)
    batches.close()
    assert {t for t in threading.enumerate() if t.name.startswith("artquant-input")} <= before


@pytest.mark.parametrize("workers, message", [(0, "workers must be at least 1, got 0."), (-2, "workers must be at least 1, got -2.")])
def test_bad_worker_counts(base_scorer, reference_images, workers, message):
    with pytest.raises(ValueError, match=message):
        base_scorer.score(reference_images[:1], workers=workers)
