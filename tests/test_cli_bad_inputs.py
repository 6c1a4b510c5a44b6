"""`artquant score | describe` never lose finished work and say what went wrong: a table of bad inputs and faults."""

import csv
import fcntl
import json
import os
import shutil

import pytest
from PIL import Image

from artquant.cli import _csv_cell, _shown, main
from artquant.scorer import ArtQuantScorer

pytestmark = pytest.mark.usefixtures("one_thread")


def _no_nan(text: str):
    def refuse(constant):
        raise AssertionError(f"bare {constant} in JSON output")

    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


@pytest.fixture()
def folder(tmp_path, reference_dir):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("astronaut.png", "camera.png", "chelsea.png"):
        shutil.copy(reference_dir / "images" / name, images / name)
    return images


@pytest.fixture()
def model_args(reference_dir):
    return ["--model", str(reference_dir / "mplug_owl2_base"), "--device", "cpu", "--dtype", "fp32", "--quiet"]


@pytest.mark.parametrize("out, fragment", [
    ("scores.txt", "--out must end in .csv or .jsonl, not scores.txt"),
    ("a_folder.csv", "is a folder; name a .csv or .jsonl file"),
    ("a_file/scores.csv", "cannot write --out"),
])
def test_a_bad_out_is_refused_before_the_model_loads(tmp_path, folder, capsys, out, fragment):
    (tmp_path / "a_folder.csv").mkdir()
    (tmp_path / "a_file").write_text("a file, not a folder")
    # The model does not exist: had it been loaded first, the error would be about the model.
    code = main(["score", str(folder), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / out)])
    assert code == 2
    assert fragment in capsys.readouterr().err


# Models and presets that do not go together: each refused with exit 2 and the core's (or training's) message.
QREALIGN = ["--preset", "qrealign-mini-quality"]
MODEL_ROWS = [
    (["score", "{images}", "--model", "{qrealign}"], "describes a model of type 'qwen3_5', not mplug_owl2"),
    (["score", "{images}", "--model", "{mplug}", *QREALIGN], "describes a model of type 'mplug_owl2', not a Qwen-VL"),
    (["score", "{images}", "--model", "{qrealign}", "--base", "{mplug}", *QREALIGN], "`base` is not used: leave it out"),
    (["score", "--engine", "ray", "{images}", "--out", "{tmp}/s.parquet", "--model", "{qrealign}", "--base", "{mplug}",
      *QREALIGN], "`base` is not used: leave it out"),
    (["score", "--engine", "ray", "{images}", "--out", "{tmp}/s.parquet", "--model", "{mplug}", *QREALIGN],
     "describes a model of type 'mplug_owl2', not a Qwen-VL"),
    (["describe", "{images}", "--model", "{qrealign}", "--base", "{mplug}", *QREALIGN], "`base` is not used"),
    (["eval", "--data", "{tmp}/eval.json", "--out", "{tmp}/eval", "--model", "{qrealign}", "--base", "{mplug}",
      *QREALIGN], "`base` is not used: leave it out"),
    (["convert", "--out", "{tmp}/merged", "--model", "{mplug}", *QREALIGN], "not a Qwen-VL model"),
    (["score", "{images}", "--preset", "qrealign-tiny"], "Unknown preset 'qrealign-tiny'; choose one of artquant,"),
    (["train", "{tmp}/train.yaml", "base_model=qrealign-mini-quality"],
     "is a qwen_vl model (the qrealign-mini-quality preset's); artquant train reproduces ArtQuant's RAD fine-tuning"),
    (["train", "{tmp}/train.yaml", "base_model=q-future/Q-ReAlign-Pro-9B"], "Q-ReAlign (Qwen-VL) models are fine-tuned"),
    (["train", "{tmp}/train.yaml", "base_model={qrealign}"], "is a model of type 'qwen3_5'; artquant train reproduces"),
]


@pytest.mark.parametrize("arguments, fragment", MODEL_ROWS)
def test_models_and_presets_that_do_not_go_together(arguments, fragment, folder, tmp_path, reference_dir, qrealign_dir,
                                                    capsys, caplog):
    (tmp_path / "train.yaml").write_text("data: [scores.csv]\n")
    (tmp_path / "eval.json").write_text(json.dumps([{"image": str(folder / "camera.png"), "gt_score": 0.5}]))
    places = {"images": folder, "qrealign": qrealign_dir, "mplug": reference_dir / "mplug_owl2_base", "tmp": tmp_path}
    try:
        code = main([argument.format(**places) for argument in arguments])
    except SystemExit as exit:  # argparse refuses a value itself
        code = exit.code
    assert code == 2
    assert fragment in capsys.readouterr().err + caplog.text
    assert not (tmp_path / "s.parquet").exists() and not (tmp_path / "merged").exists()


def test_max_pixels_must_be_positive(folder, capsys):
    assert main(["score", str(folder), "--max-pixels", "0", "--model", "x"]) == 2
    assert "--max-pixels must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("cell, written", [
    ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"), ("+1", "'+1"), ("-1+2", "'-1+2"), ("@SUM(A1)", "'@SUM(A1)"),
    ("/plain/path.png", "/plain/path.png"), (4.5, 4.5), (None, None),
    ("tab\there.png", '"tab\\there.png"'), ("caf\udce9.png", '"caf\\udce9.png"'),
])
def test_csv_cells_never_start_a_formula_and_stay_one_utf8_line(cell, written):
    assert _csv_cell(cell) == written


@pytest.mark.parametrize("name, shown", [
    ("plain name.png", "plain name.png"), ("new\nline.png", '"new\\nline.png"'), ('"quoted".png', '"\\"quoted\\".png"'),
    ("caf\udce9.png", '"caf\\udce9.png"'), ("café.png", "café.png"),
])
def test_names_on_screen_are_unambiguous(name, shown):
    assert _shown(name) == shown


def test_csv_rows_are_on_disk_as_each_batch_finishes(folder, tmp_path, model_args, monkeypatch):
    out = tmp_path / "scores.csv"
    seen_on_disk = []
    real = ArtQuantScorer.level_logits

    def watching(self, pixel_values):
        seen_on_disk.append(len(out.read_text().splitlines()) if out.exists() else 0)
        if len(seen_on_disk) == 3:
            raise KeyboardInterrupt  # a kill in the third batch
        return real(self, pixel_values)

    monkeypatch.setattr(ArtQuantScorer, "level_logits", watching)
    for i in range(3):
        shutil.copy(folder / "camera.png", folder / f"copy{i}.png")
    with pytest.raises(KeyboardInterrupt):
        main(["score", str(folder), *model_args, "--batch-size", "2", "--out", str(out)])
    assert seen_on_disk == [0, 3, 5], "header + 2 rows after batch 1, + 2 more after batch 2"
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4 and all(float(r["score"]) > 0 for r in rows)


def test_odd_file_names_round_trip_and_print_one_line_each(folder, tmp_path, model_args, capsys):
    odd = [os.fsdecode(b"caf\xe9.png"), "tab\there.png", "new\nline.png", "=formula.png"]
    for name in odd:
        shutil.copy(folder / "camera.png", folder / name)
    assert main(["score", str(folder), *model_args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 7 and all(line.count("\t") == 1 for line in lines)
    shown = {line.split("\t")[0] for line in lines}
    assert json.dumps(str(folder / "new\nline.png")) in shown and str(folder / "=formula.png") in shown

    jsonl, table = tmp_path / "s.jsonl", tmp_path / "s.csv"
    assert main(["score", str(folder), *model_args, "--out", str(jsonl)]) == 0
    assert {os.fsencode(r["path"]) for r in _no_nan(jsonl.read_text())} >= {os.fsencode(str(folder / n)) for n in odd}
    assert main(["score", str(folder), *model_args, "--out", str(table)]) == 0
    paths = [r["path"] for r in csv.DictReader(table.open(encoding="utf-8"))]
    assert json.dumps(str(folder / os.fsdecode(b"caf\xe9.png"))) in paths


def test_unreadable_folders_fifos_and_folders_named_as_images_are_reported(folder, tmp_path, model_args, monkeypatch,
                                                                           capsys):
    locked = folder / "locked"
    locked.mkdir()
    real_scandir = os.scandir

    def scandir(path="."):  # as root, chmod 000 cannot make a folder unreadable: refuse it here instead
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    os.mkfifo(folder / "pipe.png")
    out = tmp_path / "s.jsonl"
    assert main(["score", str(folder), str(tmp_path / "missing.png"), *model_args, "--out", str(out)]) == 1
    errors = {r["path"]: r["error"] for r in _no_nan(out.read_text()) if r["error"]}
    assert "cannot list the folder (Permission denied)" in errors[str(locked)]
    assert "not a regular file (a FIFO" in errors[str(folder / "pipe.png")]
    assert "no such file" in errors[str(tmp_path / "missing.png")]
    assert "scored 3 image(s), 3 failed" in capsys.readouterr().err


def test_jsonl_resume_tolerates_any_line_and_names_each_image_once(folder, tmp_path, model_args, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "s.jsonl"
    foreign = [b"[1, 2]", b'"text"', b"null", b'{"path": 5}', b'{"score": 1}', b"\xff\xfe not utf-8",
               b'{"path": "images/camera.png", "score": NaN, "error": null}', b'{"path": "torn']
    out.write_bytes(b"\n".join(foreign))
    # `images` and `images/astronaut.png` relative, then the absolute folder: each image gets one row, ever.
    assert main(["score", "images", "images/astronaut.png", *model_args, "--out", str(out)]) == 0
    assert main(["score", str(folder), *model_args, "--out", str(out)]) == 0
    assert "all 3 image(s) already scored" in capsys.readouterr().err
    lines = out.read_bytes().split(b"\n")
    assert lines[: len(foreign)] == foreign, "earlier lines are kept as they were"
    rows = _no_nan(b"\n".join(lines[len(foreign) :]).decode())
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in folder.iterdir())


def test_a_second_process_on_the_same_output_is_refused(folder, tmp_path, model_args, capsys):
    out = tmp_path / "s.jsonl"
    with out.open("a") as other_run:
        fcntl.flock(other_run.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["score", str(folder), *model_args, "--out", str(out)]) == 2
    assert "being written by another artquant process" in capsys.readouterr().err
    assert out.read_text() == ""


def test_nan_scores_fail_with_exit_1_and_null_not_nan(folder, tmp_path, model_args, monkeypatch):
    real = ArtQuantScorer.level_logits
    monkeypatch.setattr(ArtQuantScorer, "level_logits", lambda self, pv: real(self, pv) * float("nan"))
    out, table = tmp_path / "s.jsonl", tmp_path / "s.csv"
    assert main(["score", str(folder), *model_args, "--out", str(out)]) == 1
    rows = _no_nan(out.read_text())
    assert len(rows) == 3 and all(r["score"] is None and "non-finite" in r["error"] for r in rows)
    assert main(["score", str(folder), *model_args, "--out", str(table)]) == 1
    assert all(r["score"] == "" and "NaN" in r["error"] for r in csv.DictReader(table.open()))


def test_max_pixels_and_bad_images_in_describe(folder, tmp_path, model_args, capsys):
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    Image.new("RGB", (30, 30)).save(folder / "tiny.png")
    code = main(["describe", str(folder), *model_args[:-1], "--max-new-tokens", "2", "--max-pixels", "1000"])
    assert code == 1
    rows = {os.path.basename(r["path"]): r for r in _no_nan(capsys.readouterr().out)}
    assert len(rows) == 5
    assert "not an image PIL can read" in rows["broken.png"]["error"] and rows["broken.png"]["description"] is None
    assert "more than the limit of 1,000" in rows["camera.png"]["error"]
    assert rows["tiny.png"]["error"] is None and rows["tiny.png"]["description"]


def test_score_max_pixels_is_per_image(folder, model_args, capsys):
    Image.new("RGB", (30, 30)).save(folder / "tiny.png")
    assert main(["score", str(folder), *model_args, "--max-pixels", "1000"]) == 1
    out = capsys.readouterr().out
    assert out.count("more than the limit of 1,000") == 3 and f"{folder / 'tiny.png'}\t" in out


def test_an_interrupted_model_load_leaves_an_earlier_csv_alone(folder, tmp_path, capsys):
    out = tmp_path / "s.csv"
    out.write_text("path,score\nkept,1\n")
    assert main(["score", str(folder), "--model", str(tmp_path / "no-model"), "--out", str(out)]) == 2
    assert out.read_text() == "path,score\nkept,1\n"
    missing = tmp_path / "new.csv"
    assert main(["score", str(folder), "--model", str(tmp_path / "no-model"), "--out", str(missing)]) == 2
    assert not missing.exists(), "no empty file left behind"
