"""`artquant score | describe | convert` through the real entry point."""

import csv
import json
import shutil
import subprocess
import sys

import pytest

from artquant.cli import main


def test_score_csv_matches_golden_and_recurses(reference_dir, golden, tmp_path, capsys):
    images = tmp_path / "images" / "nested"
    shutil.copytree(reference_dir / "images", images)
    out = tmp_path / "scores.csv"
    code = main(["score", str(tmp_path / "images"), "--model", str(reference_dir / "artquant_lora"),
                 "--device", "cpu", "--dtype", "fp32", "--batch-size", "4", "--out", str(out), "--quiet"])
    assert code == 0
    rows = {r["path"].split("/")[-1]: r for r in csv.DictReader(out.open())}
    assert sorted(rows) == sorted(golden["images"])
    for name, expected in zip(golden["images"], golden["lora_scores"]):
        assert float(rows[name]["score"]) == pytest.approx(expected, abs=1e-4)
        expected_probs = golden["lora_level_probs"][golden["images"].index(name)]
        for level, probability in zip(golden["level_names"], expected_probs):  # every level's column, by its name
            assert float(rows[name][f"p_{level}"]) == pytest.approx(probability, abs=1e-4)
    summary = capsys.readouterr().err
    assert "scored 6 image(s), 0 failed" in summary and "best" in summary and "worst" in summary


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
