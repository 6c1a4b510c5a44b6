"""`artquant score --batch-size auto`, `--compile` and `--workers`: what they accept and refuse."""

import csv

import pytest

from artquant.cli import main


def test_cli_batch_size_auto_scores(reference_dir, reference_images, tmp_path):
    out = tmp_path / "scores.csv"
    code = main(["score", *map(str, reference_images[:2]), "--model", str(reference_dir / "mplug_owl2_base"),
                 "--device", "cpu", "--batch-size", "auto", "--out", str(out), "--quiet"])
    assert code == 0
    assert len(list(csv.DictReader(out.open()))) == 2


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--batch-size", "0"], "argument --batch-size: must be a positive integer or auto, not '0'"),
        (["--batch-size", "-3"], "argument --batch-size: must be a positive integer or auto, not '-3'"),
        (["--batch-size", "1.5"], "argument --batch-size: must be a positive integer or auto, not '1.5'"),
        (["--batch-size", "Auto"], "argument --batch-size: must be a positive integer or auto, not 'Auto'"),
        (["--engine", "ray", "--batch-size", "auto", "--out", "x.parquet"],
         "--batch-size auto and --compile apply to --engine local; give --engine ray a number."),
        (["--engine", "ray", "--compile", "--out", "x.parquet"],
         "--batch-size auto and --compile apply to --engine local; give --engine ray a number."),
    ],
)
def test_cli_bad_throughput_options(arguments, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["score", str(tmp_path), *arguments])
    assert message in capsys.readouterr().err + str(exit_info.value.code)


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_cli_bad_workers(value, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["score", str(tmp_path), "--workers", value])
    assert f"argument --workers: must be a positive integer, not {value!r}" in capsys.readouterr().err
