"""`artquant report`: the page's content for the fixture images, every input format, and a table of bad inputs."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from artquant.cli import main
from artquant.report import ReportInputError, read_scores, write_report
from report_samples import EXTERNAL, FAILED, LEVELS, SCORES, fixture_rows, full_paths, page_data, write_csv


@pytest.fixture
def fixture_csv(reference_dir, tmp_path) -> Path:
    return write_csv(tmp_path / "scores.csv", fixture_rows(reference_dir / "images"))


def test_fixture_report_content(fixture_csv, reference_dir, tmp_path):
    page = write_report(fixture_csv, tmp_path / "report")
    text = page.read_text(encoding="utf-8")
    data = page_data(page)
    images = reference_dir / "images"

    # Every scored image exactly once, best first, with the file's numbers.
    expected = sorted(SCORES, key=lambda n: -SCORES[n][0])
    assert full_paths(data) == [str(images / n) for n in expected]
    for index, name in enumerate(expected):
        score, std, probs = SCORES[name]
        assert data["score"][index] == pytest.approx(score, abs=5e-5)
        assert data["std"][index] == pytest.approx(std, abs=5e-5)
        assert data["probs"][index] == pytest.approx(list(probs), abs=5e-5)
    assert data["levels"] == list(LEVELS)
    # The failure is listed with its error, and is not among the images.
    assert data["failures"] == [[str(images / n), e] for n, e in FAILED.items()]
    assert "rocket_rgba.png" not in data["path"]
    # Summary: counts, best and worst as in the file.
    assert "<b>5</b> image(s) scored, <b>1</b> not scored" in text
    assert "best <b>8.875</b> chelsea.png" in text and "worst <b>3.500</b> camera.png" in text
    # Histogram: one bar per bin, the counts add up to the scored images, each score in its bin.
    bins = re.findall(r'<rect class="bin" data-lo="([^"]+)" data-hi="([^"]+)" data-count="(\d+)"', text)
    assert sum(int(c) for _, _, c in bins) == 5
    for score, *_ in SCORES.values():
        assert sum(int(c) for lo, hi, c in bins if float(lo) <= score < float(hi)) >= 1
    # Thumbnails: one per image, bounded JPEGs in the report folder; nothing outside the page is fetched.
    assert all(t is not None for t in data["thumb"])
    for thumb in data["thumb"]:
        with Image.open(page.parent / "thumbs" / f"{thumb}.jpg") as image:
            assert image.format == "JPEG" and max(image.size) <= 256
    assert 'loading = "lazy"' in text
    assert not EXTERNAL.findall(text)


def test_thumbnails_are_made_once_and_bounded(fixture_csv, tmp_path):
    page = write_report(fixture_csv, tmp_path / "report", thumbnail_size=64)
    thumbs = sorted((page.parent / "thumbs").iterdir())
    stamps = [t.stat().st_mtime_ns for t in thumbs]
    assert len(thumbs) == 5 and all(max(Image.open(t).size) == 64 for t in thumbs)
    write_report(fixture_csv, tmp_path / "report", thumbnail_size=64)
    assert sorted((page.parent / "thumbs").iterdir()) == thumbs
    assert [t.stat().st_mtime_ns for t in thumbs] == stamps


def test_thumbnails_show_the_picture_as_a_viewer_does(tmp_path):
    """Transparent pixels on white (not the colour hidden under them); EXIF orientation applied."""
    clear, rotated = tmp_path / "clear.png", tmp_path / "rotated.jpg"
    Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(clear)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    Image.new("RGB", (60, 30), "blue").save(rotated, exif=exif)
    rows = [{"path": str(clear), "score": 5.0, "std": 1.0, "error": None}, {"path": str(rotated), "score": 4.0, "std": 1.0, "error": None}]
    page = write_report(rows, tmp_path / "report")
    clear_thumb, rotated_thumb = (Image.open(page.parent / "thumbs" / f"{t}.jpg") for t in page_data(page)["thumb"])
    assert all(channel > 240 for channel in clear_thumb.convert("RGB").getpixel((20, 20)))
    assert rotated_thumb.size == (30, 60)


def test_jsonl_resumed_run_keeps_the_last_row_per_path(reference_dir, tmp_path):
    images = reference_dir / "images"
    lines = [
        json.dumps({"path": str(images / "camera.png"), "score": None, "std": None, "error": "OSError: busy"}),
        json.dumps({"path": str(images / "coffee.png"), "score": 4.5, "std": 0.5, "error": None}),
        '{"path": "torn',
        json.dumps({"path": str(images / "camera.png"), "score": 7.25, "std": 0.5, "error": None}),
    ]
    scores = tmp_path / "scores.jsonl"
    scores.write_text("\n".join(lines) + "\n")
    page = write_report(scores, tmp_path / "report")
    data = page_data(page)
    assert full_paths(data) == [str(images / "camera.png"), str(images / "coffee.png")]
    assert data["score"] == [7.25, 4.5] and data["failures"] == []
    assert "line 3: not JSON" in page.read_text()


def test_parquet_with_key_column(reference_dir, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    images = reference_dir / "images"
    table = pa.table({
        "key": [str(images / "chelsea.png"), str(images / "camera.png"), str(images / "nothing.png")],
        "score": [8.0, 2.5, None],
        "std": [0.5, 1.5, None],
        **{f"p_{n}": [0.6 - 0.1 * k, 0.1 * k, None] for k, n in enumerate(LEVELS)},
        "error": [None, None, "FileNotFoundError: nothing.png"],
    })
    pq.write_table(table, tmp_path / "scores.parquet")
    data = page_data(write_report(tmp_path / "scores.parquet", tmp_path / "report"))
    assert full_paths(data) == [str(images / "chelsea.png"), str(images / "camera.png")]
    assert data["score"] == [8.0, 2.5]
    assert data["probs"] == [pytest.approx([0.6, 0.5, 0.4, 0.3, 0.2]), pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])]
    assert data["failures"] == [[str(images / "nothing.png"), "FileNotFoundError: nothing.png"]]


def test_dataset_scoring_folder_of_parquet_files(reference_dir, tmp_path):
    """serve/'s dataset scoring writes one Parquet file per batch (key, score, std, p_<level>, error; NaN when not
    scored); a half-written file from a kill is skipped."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    images, folder = reference_dir / "images", tmp_path / "scored"
    folder.mkdir()
    probs = {f"p_{n}": [0.2, math.nan] for n in LEVELS}
    pq.write_table(pa.table({"key": [str(images / "rocket.png"), "shard-0/17"], "score": [7.0, math.nan],
                             "std": [1.0, math.nan], **probs, "error": [None, "shard-0/17: not an image"]}), folder / "0.parquet")
    pq.write_table(pa.table({"key": [str(images / "coffee.png")], "score": [4.0], "std": [0.5],
                             **{f"p_{n}": [0.2] for n in LEVELS}, "error": pa.array([None], pa.string())}), folder / "1.parquet")
    (folder / "2.parquet").write_bytes(b"PAR1 half written")
    page = write_report(folder, tmp_path / "report")
    data = page_data(page)
    assert full_paths(data) == [str(images / "rocket.png"), str(images / "coffee.png")] and all(data["thumb"])
    assert data["failures"] == [["shard-0/17", "shard-0/17: not an image"]]
    assert "2.parquet: not a readable Parquet file" in page.read_text()


def test_eval_folder_shows_metrics_and_scatter(reference_dir, tmp_path):
    images = reference_dir / "images"
    predictions = [
        {"image": str(images / name), "score": score, "std": 1.0, "gt_score": human}
        for name, score, human in [("astronaut.png", 6.0, 6.5), ("camera.png", 3.0, 2.0), ("coffee.png", 5.5, 5.0), ("rocket.png", 7.5, 8.0)]
    ]
    report = {"metrics": {"n": 4, "srcc": 1.0, "plcc": 0.9876, "plcc_logistic": math.nan, "krcc": None, "mae": 0.625},
              "failed": [{"image": str(images / "chelsea.png"), "error": "OSError: truncated"}],
              "predictions": predictions, "model": "release", "data": "test.json",
              "undefined": "correlations are undefined: all human scores are equal"}
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps(report))  # as training/evaluate.py writes it: NaN as NaN
    page = write_report(folder, tmp_path / "report")
    text, data = page.read_text(), page_data(page)
    assert data["human"] == [8.0, 6.5, 5.0, 2.0]  # in the page's order: predicted 7.5, 6.0, 5.5, 3.0
    assert 'data-metric="plcc">0.9876<' in text and 'data-metric="plcc_logistic">n/a<' in text
    assert 'data-metric="krcc">n/a<' in text and 'data-metric="mae">0.6250<' in text
    assert 'data-metric="n">4<' in text
    assert "Metrics shown as n/a: correlations are undefined: all human scores are equal." in text
    assert len(re.findall(r'<circle class="point"', text)) == 4
    assert data["failures"] == [[str(images / "chelsea.png"), "OSError: truncated"]]
    assert '<option value="human">' in text


def test_best_of_n_folder(reference_dir, tmp_path):
    folder = tmp_path / "bon"
    folder.mkdir()
    Image.open(reference_dir / "images" / "coffee.png").save(folder / "rank01_seed3.png")
    Image.open(reference_dir / "images" / "camera.png").save(folder / "rank02_seed0.png")
    candidates = [
        {"rank": 1, "file": "rank01_seed3.png", "seed": 3, "score": 6.5, "std": 1.0, "level_probs": dict(zip(LEVELS, (0.2, 0.4, 0.2, 0.1, 0.1))), "error": None},
        {"rank": 2, "file": "rank02_seed0.png", "seed": 0, "score": 4.0, "std": 1.0, "level_probs": dict(zip(LEVELS, (0.0, 0.1, 0.5, 0.3, 0.1))), "error": None},
    ]
    (folder / "scores.json").write_text(json.dumps({"prompt": "a red bicycle", "candidates": candidates}))
    page = write_report(folder / "scores.json", tmp_path / "report")
    data = page_data(page)
    assert data["path"] == ["rank01_seed3.png", "rank02_seed0.png"] and all(data["thumb"])
    assert data["probs"][1] == [0.0, 0.1, 0.5, 0.3, 0.1]
    assert data["description"] == ["seed 3", "seed 0"]
    assert "a red bicycle" in page.read_text()


def test_descriptions_are_merged(fixture_csv, reference_dir, tmp_path):
    images = reference_dir / "images"
    described = tmp_path / "descriptions.jsonl"
    described.write_text(
        json.dumps({"path": str(images / "camera.png"), "description": "A man <b>with</b> a camera."}) + "\n"
        + json.dumps({"path": str(images / "elsewhere.png"), "description": "not in the scores"}) + "\n"
    )
    page = write_report(fixture_csv, tmp_path / "report", descriptions=described)
    data = page_data(page)
    assert data["description"][data["path"].index("camera.png")] == "A man <b>with</b> a camera."
    assert sum(d is not None for d in data["description"]) == 1
    assert "<b>with</b>" not in page.read_text()  # embedded as data, escaped; the script writes it as text


def test_cli_report_and_bad_input(fixture_csv, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(fixture_csv), "--out", str(out), "--thumbnail-size", "96"]) == 0
    assert (out / "index.html").is_file() and "report written to" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "absent.csv"), "--out", str(out)]) == 2
    assert "scores file not found" in capsys.readouterr().err


def test_score_with_report(reference_dir, tmp_path):
    out, report = tmp_path / "scores.jsonl", tmp_path / "report"
    code = main(["score", str(reference_dir / "images"), "--model", str(reference_dir / "mplug_owl2_base"), "--device", "cpu",
                 "--out", str(out), "--report", str(report), "--quiet"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    data = page_data(report / "index.html")
    by_path = dict(zip(full_paths(data), data["score"]))
    assert len(by_path) == len(rows) == 6
    for row in rows:
        assert by_path[row["path"]] == pytest.approx(row["score"], abs=5e-5)
    assert data["score"] == sorted(data["score"], reverse=True)


def test_score_without_out_reports_the_rows_it_printed(reference_dir, tmp_path, capsys):
    report = tmp_path / "report"
    code = main(["score", str(reference_dir / "images" / "camera.png"), "--model", str(reference_dir / "mplug_owl2_base"),
                 "--device", "cpu", "--report", str(report), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out.strip().split("\t")
    data = page_data(report / "index.html")
    assert full_paths(data) == [printed[0]]
    assert data["score"][0] == pytest.approx(float(printed[1].split(" ")[0]), abs=1e-4)
    assert "<title>Scores</title>" in (report / "index.html").read_text()


def _bad(tmp_path: Path, name: str, content: bytes | str | None) -> Path:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


HEADER = "path,score,std,error\n"


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("absent.csv", None, "scores file not found"),
        ("empty.csv", "", "holds no scored rows: score images first"),
        ("empty.jsonl", "\n\n", "holds no scored rows"),
        ("header_only.csv", HEADER, "holds no scored rows"),
        ("scores.txt", HEADER + "a.png,5,1,\n", "unknown format '.txt'"),
        ("no_score.csv", "path,std\na.png,1\n", "no 'score' column"),
        ("no_path.csv", "image_name,score\na.png,5\n", "no path column"),
        ("only_torn.jsonl", '{"path": "a.png", "sco', "line 1: not JSON"),
        ("not_objects.jsonl", "[1, 2]\n", "line 1: not a JSON object"),
        ("no_paths.jsonl", '{"score": 5}\n', "no image path"),
        ("broken.parquet", "PAR1 not really", "not a readable Parquet file"),
    ],
)
def test_bad_scores_files(tmp_path, name, content, message):
    with pytest.raises(ReportInputError, match=re.escape(message)):
        write_report(_bad(tmp_path, name, content), tmp_path / "report")


@pytest.mark.parametrize(
    "line, error",
    [
        ('{"path": "x.png", "score": null, "std": null, "error": null}', "no score in the scores file"),
        ('{"path": "x.png", "score": NaN, "std": NaN, "error": null}', "score is not finite"),
        ('{"path": "x.png", "score": "high", "std": 1, "error": null}', "unreadable number in the scores file"),
        ('{"path": "x.png", "score": NaN, "error": "OSError: gone"}', "OSError: gone"),
        ('{"path": "x.png"}', "no score in the scores file"),
    ],
)
def test_unscored_rows_become_listed_failures(tmp_path, line, error):
    scores = _bad(tmp_path, "scores.jsonl", line + "\n" + '{"path": "ok.png", "score": 5.5, "std": 1, "error": null}\n')
    data = page_data(write_report(scores, tmp_path / "report"))
    assert data["path"] == ["ok.png"] and data["score"] == [5.5]
    (failure,) = data["failures"]
    assert failure[0] == "x.png" and error in failure[1]


def test_a_run_where_nothing_scored_still_lists_its_failures(tmp_path):
    scores = _bad(tmp_path, "scores.jsonl", '{"path": "a.png", "score": null, "error": "OSError: gone"}\n')
    page = write_report(scores, tmp_path / "report")
    assert page_data(page)["failures"] == [["a.png", "OSError: gone"]] and page_data(page)["path"] == []
    assert "No image was scored." in page.read_text()


def test_csv_empty_score_is_a_failure(tmp_path):
    scores = _bad(tmp_path, "scores.csv", HEADER + "a.png,,,\nb.png,nan,,\nc.png,4,1,\n")
    data = page_data(write_report(scores, tmp_path / "report"))
    assert data["path"] == ["c.png"]
    assert data["failures"] == [["a.png", "no score in the scores file"], ["b.png", "score is not finite"]]


def test_missing_and_unreadable_images_get_placeholders(reference_dir, tmp_path):
    (tmp_path / "not_an_image.png").write_bytes(b"\x89PNG but no")
    rows = [
        {"path": str(reference_dir / "images" / "coffee.png"), "score": 6, "std": 1, "error": None},
        {"path": str(tmp_path / "gone.png"), "score": 5, "std": 1, "error": None},
        {"path": str(tmp_path / "not_an_image.png"), "score": 4, "std": 1, "error": None},
    ]
    page = write_report(rows, tmp_path / "report")
    data = page_data(page)
    assert data["thumb"][0] is not None and data["thumb"][1:] == [None, None]
    assert data["link"][1:] == [None, None]
    text = page.read_text()
    assert "1 image file(s) not found" in text and "not_an_image.png: cannot make a thumbnail" in text
    assert '"placeholder", "no image file"' in text  # the script's placeholder for rows without a thumbnail


@pytest.mark.parametrize(
    "paths, prefix",
    [(["/data/a/x.png", "/data/a/y.png"], "/data/a/"), (["/data/a/x.png", "/data/b/y.png"], "/data/"),
     (["/a/x.png", "/b/y.png"], ""), (["x.png", "y.png"], ""), (["/data/ab.png", "/data/ac.png"], "/data/")],
)
def test_the_shared_folder_is_written_once(tmp_path, paths, prefix):
    data = page_data(write_report([{"path": p, "score": 5.0, "std": 1.0} for p in paths], tmp_path / "report"))
    assert data["pathPrefix"] == prefix and full_paths(data) == paths


def test_relative_paths_resolve_against_the_scores_folder_or_image_root(reference_dir, tmp_path):
    scores = write_csv(tmp_path / "scores.csv", [{"path": "images/chelsea.png", "score": 7, "std": 1}])
    (tmp_path / "images").mkdir()
    Image.open(reference_dir / "images" / "chelsea.png").save(tmp_path / "images" / "chelsea.png")
    assert page_data(write_report(scores, tmp_path / "a"))["thumb"][0] is not None  # beside the scores file
    elsewhere = tmp_path / "elsewhere"
    assert page_data(write_report(scores, tmp_path / "b", image_root=elsewhere))["thumb"] == [None]
    data = page_data(write_report(scores, tmp_path / "c", image_root=tmp_path))
    assert data["linkBase"] + data["link"][0] == "../images/chelsea.png"


def test_non_utf8_paths(reference_dir, tmp_path):
    """A Latin-1 file name in a CSV: the image is still found, and the page shows U+FFFD for the odd byte."""
    name = os.fsdecode(b"caf\xe9.png")
    Image.open(reference_dir / "images" / "coffee.png").save(tmp_path / name)
    scores = tmp_path / "scores.csv"
    scores.write_bytes(HEADER.encode() + os.fsencode(tmp_path / name) + b",6.5,1,\n" + b"plain.png,5,1,\n")
    page = write_report(scores, tmp_path / "report")
    data = page_data(page)
    assert data["path"][0].endswith("caf\ufffd.png") and data["thumb"][0] is not None
    page.read_bytes().decode("utf-8")  # the page itself is valid UTF-8


def test_csv_cells_quoted_by_the_score_cli(reference_dir, tmp_path):
    """The score CLI writes odd names as JSON string literals and guards a leading - with a quote mark."""
    odd = tmp_path / os.fsdecode(b"tab\there \xe9.png")
    Image.open(reference_dir / "images" / "coffee.png").save(odd)
    scores = write_csv(tmp_path / "scores.csv", [
        {"path": json.dumps(str(odd)), "score": 6.5, "std": 1},
        {"path": "'-dash.png", "error": "'-1 is not a size"},
    ])
    data = page_data(write_report(scores, tmp_path / "report"))
    assert data["pathPrefix"] + data["path"][0] == str(odd).replace("\udce9", "\ufffd") and data["thumb"][0]
    assert data["failures"] == [["-dash.png", "-1 is not a size"]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"descriptions": "absent.jsonl"}, "descriptions file not found"),
        ({"thumbnail_size": 8}, "at least 16 pixels"),
    ],
)
def test_bad_options(fixture_csv, tmp_path, kwargs, message):
    with pytest.raises(ReportInputError, match=message):
        write_report(fixture_csv, tmp_path / "report", **kwargs)


def test_folder_without_known_report(tmp_path):
    with pytest.raises(ReportInputError, match=r"folder without report.json \(artquant eval\), scores.json"):
        read_scores(tmp_path)


def test_report_needs_neither_torch_nor_the_model():
    code = ("import sys, artquant.report; "
            "print(sorted(m for m in ('torch', 'transformers', 'artquant.scorer') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
