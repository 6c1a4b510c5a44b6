"""`artquant score --engine ray`: a folder, two Parquet shards, a WebDataset tar and a Hugging Face dataset; killed
mid-run and resumed."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve_helpers import kill_session, ray_free_env, start_cli, wait_for

pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TOLERANCE = 1e-4  # other batch shapes than `artquant score`'s
FOLDER, PER_SHARD, IN_TAR, IN_HF = 120, 50, 60, 20


def _encoded(rng: np.random.Generator, index: int) -> tuple[str, bytes]:
    """A small random picture; every fifth one RGBA or grey, every seventh a JPEG."""
    size = (int(rng.integers(6, 40)), int(rng.integers(6, 40)))
    pixels = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA")
    image = image if index % 5 == 0 else image.convert("L" if index % 5 == 1 else "RGB")
    kind = "jpg" if index % 7 == 0 else "png"
    buffer = io.BytesIO()
    (image.convert("RGB") if kind == "jpg" else image).save(buffer, format="JPEG" if kind == "jpg" else "PNG")
    return kind, buffer.getvalue()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    """Sources in the layouts users have, and every item's encoded bytes by the key the output must use."""
    root = tmp_path_factory.mktemp("ray_data")
    rng = np.random.default_rng(11)
    expected: dict[str, bytes] = {}
    folder = root / "folder"
    (folder / "sub").mkdir(parents=True)
    for i in range(FOLDER):
        kind, data = _encoded(rng, i)
        path = folder / ("sub" if i % 2 else "") / f"{i:04d}.{kind}"
        path.write_bytes(data)
        expected[str(path)] = data
    broken = folder / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    for shard in range(2):  # img2dataset's parquet output: key + jpg bytes (+ caption)
        keys, images = [], []
        for i in range(PER_SHARD):
            _, data = _encoded(rng, i)
            keys.append(f"{shard:05d}{i:04d}")
            images.append(data)
            expected[keys[-1]] = data
        images[3] = b"garbage"
        expected.pop(keys[3])
        pq.write_table(pa.table({"key": keys, "jpg": images, "caption": ["c"] * PER_SHARD}), root / f"part-{shard}.parquet")
    with tarfile.open(root / "00002.tar", "w") as tar:  # img2dataset's webdataset output: 000020000.jpg/.txt/.json
        for i in range(IN_TAR):
            kind, data = _encoded(rng, i)
            key = f"0002{i:05d}"
            expected[key] = data
            for name, payload in ((f"{key}.{kind}", data), (f"{key}.txt", b"a caption"), (f"{key}.json", json.dumps({"key": key}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    sources = [str(folder), str(root / "part-0.parquet"), str(root / "part-1.parquet"), str(root / "00002.tar")]
    datasets = pytest.importorskip("datasets")  # a Hugging Face dataset with an Image column, saved to disk
    records = {"id": [f"hf-{i}" for i in range(IN_HF)], "image": [{"bytes": _encoded(rng, i)[1], "path": None} for i in range(IN_HF)]}
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()})
    datasets.Dataset.from_dict(records, features=features).save_to_disk(str(root / "hf"))
    expected.update({key: image["bytes"] for key, image in zip(records["id"], records["image"])})
    sources.append(f"hf:{root / 'hf'}")
    failing = {str(broken): "not an image PIL can read", "000000003": "not an image PIL can read", "000010003": "not an image PIL can read"}
    return {"root": root, "sources": sources, "expected": expected, "failing": failing}


@pytest.fixture(scope="module")
def local_scores(dataset, base_scorer, one_thread) -> dict[str, float]:
    """What the in-process scorer (`artquant score`'s engine) gives for the same images."""
    keys = list(dataset["expected"])
    images = [Image.open(io.BytesIO(dataset["expected"][k])) for k in keys]
    return {key: result.score for key, result in zip(keys, base_scorer.score(images, batch_size=16))}


def _complete_rows(out: Path) -> int:
    """Rows in the files a killed run finished (a file it was writing has no footer and does not count)."""
    rows = 0
    for file in out.glob("*.parquet"):
        try:
            rows += pq.read_metadata(file).num_rows
        except (OSError, pa.ArrowInvalid):
            pass
    return rows


def _cli_args(reference_dir: Path, dataset: dict, out: Path) -> list[str]:
    model = str(reference_dir / "mplug_owl2_base")
    return ["score", "--engine", "ray", *dataset["sources"], "--out", str(out), "--model", model, "--dtype", "fp32", "--batch-size", "16"]


def test_killed_run_resumes_without_losing_or_repeating_a_key_and_matches_local_scores(reference_dir, dataset, local_scores, tmp_path):
    out = tmp_path / "scores.parquet"
    args = _cli_args(reference_dir, dataset, out)
    log = tmp_path / "first.log"
    # Its scoring actor stalls after two batches, so the kill (once a batch is on disk) lands mid-run however fast the
    # machine scores.
    stalled = ray_free_env(ARTQUANT_TEST_STALL_AFTER_BATCHES="2", PYTHONPATH=os.pathsep.join(
        filter(None, [str(Path(__file__).parent / "stalled_scoring"), os.environ.get("PYTHONPATH")])))
    first = start_cli(args, log, stalled)
    try:  # killed (with all its Ray processes) as soon as a batch is on disk
        wait_for(lambda: _complete_rows(out) > 0, 300, "the first batch to be written", first, log)
    finally:
        kill_session(first)
    written_before = _complete_rows(out)
    total = len(dataset["expected"]) + len(dataset["failing"])
    assert 0 < written_before < total, "the first run was not killed mid-run"

    log = tmp_path / "second.log"
    second = start_cli(args, log, ray_free_env())
    try:
        wait_for(lambda: second.poll() is not None, 300, "the rerun to finish", second, None)
    finally:
        kill_session(second)
    message = log.read_text()
    assert second.returncode in (0, 1), message  # 1 when this run met one of the unreadable items
    done = int(message.split(" already done")[0].rsplit(", ", 1)[1])
    assert done == written_before, message  # the rerun skipped exactly what the killed run had written

    table = pq.read_table(out).to_pydict()
    assert sorted(table["key"]) == sorted([*dataset["expected"], *dataset["failing"]])  # none lost, none twice
    rows = {key: i for i, key in enumerate(table["key"])}
    for key, fragment in dataset["failing"].items():
        assert fragment in table["error"][rows[key]] and np.isnan(table["score"][rows[key]])
    keys = list(dataset["expected"])
    got = np.array([table["score"][rows[key]] for key in keys])
    np.testing.assert_allclose(got, [local_scores[key] for key in keys], atol=TOLERANCE, rtol=0)
    assert all(table["error"][rows[key]] is None for key in keys)
    probabilities = np.array([[table[f"p_{n}"][rows[key]] for n in ("excellent", "good", "fair", "poor", "bad")] for key in keys])
    np.testing.assert_allclose(probabilities.sum(1), 1, atol=1e-5)


BAD_SOURCES = [
    # (sources, extra arguments) -> message fragment
    (["missing-folder"], [], "missing-folder: no such file or folder."),
    (["notes.txt"], [], "notes.txt: not an image, a .parquet file or a .tar WebDataset shard"),
    (["nokey.parquet"], [], "has no key column among jpg: name it with --key-column"),
    (["nokey.parquet"], ["--key-column", "id"], "has no column 'id' (it has jpg)"),
]


@pytest.mark.parametrize("sources, extra, fragment", BAD_SOURCES)
def test_bad_sources_fail_with_a_message_before_any_work(tmp_path, monkeypatch, capsys, sources, extra, fragment):
    from artquant.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    pq.write_table(pa.table({"jpg": [b"x"]}), tmp_path / "nokey.parquet")
    assert main(["score", "--engine", "ray", *sources, *extra, "--out", "s.parquet"]) == 2
    assert fragment in capsys.readouterr().err
    import ray

    assert not ray.is_initialized() and not (tmp_path / "s.parquet").exists()  # refused before starting Ray


def test_engine_ray_needs_a_parquet_output(tmp_path):
    from artquant.cli import main

    with pytest.raises(SystemExit, match="--engine ray writes Parquet: pass --out scores.parquet"):
        main(["score", "--engine", "ray", str(tmp_path), "--out", "scores.csv"])


def test_max_pixels_refuses_only_the_image_over_it_with_the_core_message(reference_dir, tmp_path):
    """`--max-pixels` on `--engine ray`: the image over the limit becomes an error row (the message the in-process
    scorer gives), and the others still score."""
    from artquant.scorer.images import ImageInputError, _check_pixels

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for name, side in (("a.png", 8), ("b.png", 12), ("big.png", 40)):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), "RGB").save(folder / name)
    out, log = tmp_path / "scores.parquet", tmp_path / "run.log"
    model = str(reference_dir / "mplug_owl2_base")
    args = ["score", "--engine", "ray", str(folder), "--out", str(out), "--model", model, "--dtype", "fp32",
            "--batch-size", "4", "--max-pixels", "1000"]
    process = start_cli(args, log, ray_free_env())
    try:
        wait_for(lambda: process.poll() is not None, 300, "the run to finish", process, None)
    finally:
        kill_session(process)
    assert process.returncode == 1, log.read_text()  # 1: one item failed
    assert "scored 2 image(s), 1 failed" in log.read_text()

    table = pq.read_table(out).to_pydict()
    rows = {Path(key).name: i for i, key in enumerate(table["key"])}
    assert sorted(rows) == ["a.png", "b.png", "big.png"]
    big = rows["big.png"]
    with pytest.raises(ImageInputError) as core:
        _check_pixels(40, 40, 1000, str(folder / "big.png"))
    assert table["error"][big] == str(core.value) and np.isnan(table["score"][big])
    for name in ("a.png", "b.png"):
        i = rows[name]
        assert table["error"][i] is None and np.isfinite(table["score"][i])
        total = sum(table[f"p_{n}"][i] for n in ("excellent", "good", "fair", "poor", "bad"))
        assert abs(total - 1) < 1e-5


def test_the_cpu_stage_reads_the_preprocessing_without_the_model(reference_dir, base_scorer, lora_scorer, qrealign_dir,
                                                                 qrealign_scorer):
    from artquant import ArtQuantScorer

    for model, scorer in ((reference_dir / "mplug_owl2_base", base_scorer), (reference_dir / "artquant_lora", lora_scorer),
                          (qrealign_dir, qrealign_scorer)):
        assert ArtQuantScorer.load_image_config(model, preset=scorer.preset) == scorer.image_config


@pytest.fixture(params=["artquant", "qrealign-mini-quality"])
def stage_scorer(request, one_thread):
    """A scorer of either family: mPLUG-Owl2 (fixed-size pixel values) or Q-ReAlign (per-image patch counts)."""
    return request.getfixturevalue("base_scorer" if request.param == "artquant" else "qrealign_scorer")


def test_cpu_stage_makes_the_models_pixel_values_and_the_actor_scores_them_as_the_core(stage_scorer):
    """The CPU stage gives each row the core's `pixel_values` bit for bit (any shape: Qwen-VL's patch counts differ
    per image); the actor rebuilds the batch with the core's collation and scores it as `score` does, bad rows stay
    error rows."""
    import torch
    from safetensors.torch import load

    from artquant.scorer.preprocessing import iter_pixel_batches
    from artquant.serve.dataset import ScoringActor, preprocess_rows

    rng = np.random.default_rng(3)
    images = [_encoded(rng, i)[1] for i in range(5)] + [b"garbage"]
    keys = np.array([f"k{i}" for i in range(6)], dtype=object)
    batch = {"key": keys, "image": np.array(images, dtype=object), "error": np.array([None] * 6, dtype=object)}
    batch["error"][2] = "k2: no image"
    config = stage_scorer.image_config
    rows = preprocess_rows(batch, config)
    assert rows["pixel_values"][2] is None and rows["pixel_values"][5] is None
    for i in (0, 1, 3, 4):
        core = next(iter_pixel_batches([images[i]], config, 1, workers=1)).pixel_values
        stored = load(rows["pixel_values"][i])
        expected = vars(core) if not isinstance(core, torch.Tensor) else {"pixel_values": core}
        assert stored.keys() == expected.keys()
        assert all(torch.equal(stored[name], expected[name]) for name in stored)  # bit for bit the core's
    expected = stage_scorer.score([Image.open(io.BytesIO(images[i])) for i in (0, 1, 3, 4)], batch_size=4)
    actor = ScoringActor.__new__(ScoringActor)
    actor.hold(stage_scorer)
    table = actor(rows).to_pydict()
    assert table["error"][2] == "k2: no image" and "k5: not an image PIL can read" in table["error"][5]
    assert np.isnan(table["score"][2]) and np.isnan(table["score"][5])
    np.testing.assert_allclose([table["score"][i] for i in (0, 1, 3, 4)], [r.score for r in expected], atol=1e-5, rtol=0)


def test_qrealign_preset_on_ray_matches_artquant_score(qrealign_dir, qrealign_images, tmp_path):
    """`score --engine ray` with a Q-ReAlign preset: images of different sizes (so different patch counts) in one
    batch, a broken file as an error row, and the scores `artquant score` writes for the same folder."""
    from artquant.cli import main

    folder = tmp_path / "images"
    folder.mkdir()
    for path in qrealign_images:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    model = ["--model", str(qrealign_dir), "--preset", "qrealign-mini-aesthetics", "--dtype", "fp32"]
    local = tmp_path / "local.jsonl"
    assert main(["score", str(folder), *model, "--device", "cpu", "--out", str(local), "--quiet", "--batch-size", "3"]) == 1
    expected = {row["path"]: row for row in map(json.loads, local.read_text().splitlines())}

    out, log = tmp_path / "scores.parquet", tmp_path / "run.log"
    process = start_cli(["score", "--engine", "ray", str(folder), "--out", str(out), *model, "--batch-size", "4"], log,
                        ray_free_env())
    try:
        wait_for(lambda: process.poll() is not None, 300, "the run to finish", process, None)
    finally:
        kill_session(process)
    assert process.returncode == 1 and "scored 6 image(s), 1 failed" in log.read_text(), log.read_text()
    table = pq.read_table(out).to_pylist()
    assert sorted(row["key"] for row in table) == sorted(expected)
    for row in table:
        want = expected[row["key"]]
        if want["error"] is not None:
            assert row["error"] == want["error"] and np.isnan(row["score"])
            continue
        assert row["error"] is None
        for column in ("score", "std", "p_excellent", "p_good", "p_fair", "p_poor", "p_bad"):
            assert row[column] == pytest.approx(want[column], abs=1e-5), column
