"""`artquant score | describe | convert` through the real entry point, for ArtQuant (mPLUG-Owl2) and a Q-ReAlign
preset (Qwen3.5-VL, the tiny checkpoint)."""

import csv
import itertools
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from artquant.cli import PRESET_HELP, main
from artquant.scorer.presets import PRESETS


@dataclass
class Case:
    """A model through the CLI: its arguments, a folder of images and their golden scores by file name."""

    model_args: list[str]
    images: Path
    scores: dict[str, float]
    score_range: tuple[float, float]
    level_probs: dict[str, list[float]] | None = None  # golden probabilities (excellent .. bad), where recorded


@pytest.fixture(params=["artquant", "qrealign-mini-quality"])
def case(request) -> Case:
    """ArtQuant's LoRA release on the reference fixture, or the Q-ReAlign quality preset on the tiny Qwen3.5-VL
    (golden scores from the authors' code)."""
    if request.param == "artquant":
        reference, golden = request.getfixturevalue("reference_dir"), request.getfixturevalue("golden")
        return Case(["--model", str(reference / "artquant_lora")], reference / "images",
                    dict(zip(golden["images"], golden["lora_scores"])), (1.0, 10.0),
                    dict(zip(golden["images"], golden["lora_level_probs"])))
    return request.getfixturevalue("qrealign_case")


@pytest.fixture()
def qrealign_case(qrealign_dir, qrealign_images, qrealign_golden) -> Case:
    return Case(["--model", str(qrealign_dir), "--preset", "qrealign-mini-quality"], qrealign_images[0].parent,
                qrealign_golden["scores"]["quality"], (0.0, 1.0))


def test_preset_help_names_every_preset():
    """The help is written out (reading PRESETS would import torch into `--help`): it must name exactly PRESETS."""
    named = set()
    for word in re.sub(r" \([^)]*\)", "", PRESET_HELP).split(", "):  # notes in parentheses left out
        parts = re.split(r"(\{[^}]*\})", word)  # qrealign-{mini,lite,pro}-{...}: every combination
        choices = [part[1:-1].split(",") if part.startswith("{") else [part] for part in parts]
        named |= {"".join(combination) for combination in itertools.product(*choices)}
    assert named == set(PRESETS)


def test_score_csv_matches_golden_for_either_family(case, tmp_path, capsys):
    images = tmp_path / "images" / "nested"
    shutil.copytree(case.images, images)
    out = tmp_path / "scores.csv"
    code = main(["score", str(tmp_path / "images"), *case.model_args, "--device", "cpu", "--dtype", "fp32",
                 "--batch-size", "4", "--out", str(out), "--quiet"])
    assert code == 0
    rows = {r["path"].split("/")[-1]: r for r in csv.DictReader(out.open())}
    assert sorted(rows) == sorted(case.scores)
    for name, expected in case.scores.items():
        assert float(rows[name]["score"]) == pytest.approx(expected, abs=1e-4)
        probabilities = [float(rows[name][f"p_{level}"]) for level in ("excellent", "good", "fair", "poor", "bad")]
        assert sum(probabilities) == pytest.approx(1, abs=1e-5)
        if case.level_probs is not None:  # every level's column, by its name
            assert probabilities == pytest.approx(case.level_probs[name], abs=1e-4)
        low, high = case.score_range
        assert low <= float(rows[name]["score"]) <= high and float(rows[name]["std"]) <= high - low
    summary = capsys.readouterr().err
    assert f"scored {len(case.scores)} image(s), 0 failed" in summary and "best" in summary and "worst" in summary


def test_jsonl_resumes_and_failures_exit_1(reference_dir, golden, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(reference_dir / "images", folder)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "scores.jsonl"
    args = ["score", str(folder), "--model", str(reference_dir / "mplug_owl2_base"), "--device", "cpu", "--out", str(out), "--quiet"]
    assert main(args) == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 7 and sum(r["error"] is not None for r in rows) == 1
    scored = {r["path"].split("/")[-1]: r["score"] for r in rows if r["error"] is None}
    assert scored["chelsea.png"] == pytest.approx(golden["base_scores"][golden["images"].index("chelsea.png")], abs=1e-4)

    # A kill mid-write leaves a torn line; the rerun keeps every row and only retries what is missing.
    with out.open("a") as handle:
        handle.write('{"path": "torn')
    (folder / "broken.png").unlink()
    shutil.copy(folder / "camera.png", folder / "zz_new.png")
    assert main(args) == 0
    lines = out.read_text().splitlines()
    assert lines[:7] == [json.dumps(r) for r in rows]
    new_rows = [json.loads(line) for line in lines[8:]]
    assert [r["path"].split("/")[-1] for r in new_rows] == ["zz_new.png"]


def test_jsonl_resumes_with_a_qrealign_preset(qrealign_case, tmp_path):
    case = qrealign_case
    folder = tmp_path / "images"
    shutil.copytree(case.images, folder)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "scores.jsonl"
    args = ["score", str(folder), *case.model_args, "--device", "cpu", "--dtype", "fp32", "--out", str(out), "--quiet"]
    assert main(args) == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(case.scores) + 1 and sum(r["error"] is not None for r in rows) == 1
    (folder / "broken.png").unlink()
    name = next(iter(case.scores))
    shutil.copy(folder / name, folder / "zz_new.png")
    assert main(args) == 0
    new_rows = [json.loads(line) for line in out.read_text().splitlines()[len(rows) :]]
    assert [r["path"].split("/")[-1] for r in new_rows] == ["zz_new.png"]
    assert new_rows[0]["score"] == pytest.approx(case.scores[name], abs=1e-4)


def test_convert_then_score_a_qrealign_checkpoint(qrealign_dir, qrealign_images, qrealign_golden, tmp_path):
    out = tmp_path / "converted"
    preset = ["--preset", "qrealign-mini-aesthetics"]
    assert main(["convert", "--model", str(qrealign_dir), *preset, "--device", "cpu", "--out", str(out)]) == 0
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    image = qrealign_images[0]
    assert main(["score", str(image), "--model", str(out), *preset, "--device", "cpu", "--dtype", "fp32",
                 "--out", str(tmp_path / "s.jsonl"), "--quiet"]) == 0
    row = json.loads((tmp_path / "s.jsonl").read_text())
    assert row["score"] == pytest.approx(qrealign_golden["scores"]["aesthetics"][image.name], abs=1e-4)


def test_describe_with_a_qrealign_preset(qrealign_dir, qrealign_images, capsys):
    code = main(["describe", *map(str, qrealign_images[:2]), "--model", str(qrealign_dir), "--preset",
                 "qrealign-lite-aesthetics", "--device", "cpu", "--max-new-tokens", "3"])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["path"] for row in rows] == [str(path) for path in qrealign_images[:2]]
    assert all(row["description"] and row["error"] is None for row in rows)


def test_convert_then_score(reference_dir, golden, tmp_path):
    out = tmp_path / "merged"
    assert main(["convert", "--model", str(reference_dir / "artquant_lora"), "--device", "cpu", "--out", str(out)]) == 0
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    code = main(["score", str(reference_dir / "images" / "astronaut.png"), "--model", str(out), "--device", "cpu",
                 "--out", str(tmp_path / "s.jsonl"), "--quiet"])
    assert code == 0
    row = json.loads((tmp_path / "s.jsonl").read_text())
    assert row["score"] == pytest.approx(golden["lora_scores"][0], abs=1e-4)


def test_describe_prints_json_lines(reference_dir, capsys):
    code = main(["describe", str(reference_dir / "images" / "camera.png"), "--model", str(reference_dir / "mplug_owl2_base"),
                 "--device", "cpu", "--max-new-tokens", "4"])
    assert code == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert row["path"].endswith("camera.png") and row["description"] and row["error"] is None


def test_missing_model_is_a_clear_error(tmp_path, reference_dir, capsys):
    code = main(["score", str(reference_dir / "images"), "--model", str(tmp_path / "nothing-here"), "--device", "cpu"])
    assert code == 2
    assert "neither a checkpoint folder nor a Hugging Face id" in capsys.readouterr().err


def test_console_script_runs(reference_dir):
    result = subprocess.run([sys.executable, "-m", "artquant.cli", "score", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--batch-size" in result.stdout


@pytest.mark.parametrize("human, extra", [([0.6, 0.7, 0.9, 0.3], []), ([60, 70, 90, 30], ["--score-range", "0", "100"])])
def test_eval_compares_on_the_presets_scale(qrealign_case, tmp_path, human, extra):
    """Human scores on the preset's 0..1 (or rescaled from --score-range); level accuracy by Q-ReAlign's levels."""
    names = list(qrealign_case.scores)[:4]
    data = tmp_path / "eval.json"
    data.write_text(json.dumps([{"image": name, "gt_score": score} for name, score in zip(names, human)]))
    code = main(["eval", *qrealign_case.model_args, "--device", "cpu", "--dtype", "fp32", "--data", str(data),
                 "--image-folder", str(qrealign_case.images), "--out", str(tmp_path / "eval"), "--no-plots", *extra])
    assert code == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    predictions = report["predictions"]
    assert [p["gt_score"] for p in predictions] == pytest.approx([0.6, 0.7, 0.9, 0.3], abs=1e-12)
    assert [p["score"] for p in predictions] == pytest.approx([qrealign_case.scores[n] for n in names], abs=1e-4)
    # Predicted 0.57..0.61 are "good" (0.5 < s <= 0.75): right for 0.6 and 0.7, wrong for 0.9 and 0.3.
    assert report["metrics"]["level_accuracy"] == 0.5
    assert report["metrics"]["mae"] == pytest.approx(
        sum(abs(qrealign_case.scores[n] - h) for n, h in zip(names, [0.6, 0.7, 0.9, 0.3])) / 4, abs=1e-4)
