"""The report in a real browser: headless Chromium opens it from disk (no network) and we read back the DOM its
script drew, and a screenshot. Skips where Debian's chromium is not installed (apt-get install chromium)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from artquant.report import write_report

from report_samples import SCORES, fixture_rows, write_csv

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")


def chromium(*arguments: str) -> str:
    """Runs headless Chromium with a fresh profile and nothing that reaches the network; returns its stdout."""
    profile = tempfile.mkdtemp(prefix="artquant-chromium-")
    try:
        result = subprocess.run(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}", "--window-size=1280,1000",
             *arguments],
            capture_output=True, text=True, timeout=120, check=True,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return result.stdout


def drawn_cards(page: Path, fragment: str = "") -> list[tuple[float, str]]:
    """(score, path) of the cards the page's script drew for `page#fragment`, in page order."""
    dom = chromium("--dump-dom", page.as_uri() + (f"#{fragment}" if fragment else ""))
    cards = re.findall(r'<figure class="card" data-index="\d+" data-score="([^"]+)">(.*?)</figure>', dom, re.S)
    return [(float(score), re.search(r'<div class="path" title="([^"]+)"', body).group(1)) for score, body in cards]


@pytest.fixture(scope="module")
def page(reference_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("browser")
    return write_report(write_csv(folder / "scores.csv", fixture_rows(reference_dir / "images")), folder / "report")


def test_images_in_score_order_with_histogram_and_failures(page, reference_dir):
    dom = chromium("--dump-dom", page.as_uri())
    cards = drawn_cards(page)
    expected = sorted(SCORES.items(), key=lambda item: -item[1][0])
    assert cards == [(values[0], str(reference_dir / "images" / name)) for name, values in expected]
    assert dom.count('loading="lazy"') == len(SCORES)
    assert len(re.findall(r'<rect class="bin"', dom)) >= 10
    assert "rocket_rgba.png</td><td>ImageInputError: cannot identify image file</td>" in dom
    assert '<section id="failures">' in dom  # no longer hidden
    # Each card carries its level-probability bars (shown on hover or click), the most probable level marked.
    start = dom.index('<figure class="card"')
    first_card = dom[start:dom.index("</figure>", start)]
    widths = re.findall(r'<div class="fill" style="width: ([\d.]+)%;">', first_card)
    assert [float(w) for w in widths] == pytest.approx([100 * p for p in SCORES["chelsea.png"][2]], abs=0.05)
    assert '<div class="bar top"><span class="name">excellent</span>' in first_card
    assert '<span class="level">excellent</span>' in first_card


def test_score_range_filter_hides_the_others(page):
    cards = drawn_cards(page, "min=5&max=7.2")
    assert [score for score, _ in cards] == [7.125, 6.25, 5.0]
    dom = chromium("--dump-dom", page.as_uri() + "#min=5&max=7.2")
    shaded = re.findall(r'<rect class="bin out" data-lo="([^"]+)" data-hi="([^"]+)"', dom)
    assert shaded and all(float(hi) <= 5 or float(lo) > 7.2 for lo, hi in shaded)


def test_sort_by_name_and_by_std(page):
    names = [Path(path).name for _, path in drawn_cards(page, "sort=name&order=asc")]
    assert names == sorted(SCORES)
    by_std = [Path(path).name for _, path in drawn_cards(page, "sort=std")]
    assert by_std == sorted(SCORES, key=lambda n: -SCORES[n][1])


def test_pages_of_a_large_report(tmp_path):
    rows = [{"path": f"img{k:04d}.png", "score": 1 + 9 * k / 299, "std": 1.0, "error": None} for k in range(300)]
    page = write_report(rows, tmp_path / "report")
    second = drawn_cards(page, "page=2")
    assert len(second) == 120 and second[0][1] == "img0179.png"  # best first: ranks 121 to 240


def test_screenshot_shows_thumbnails(page, tmp_path):
    shot = tmp_path / "report.png"
    chromium(f"--screenshot={shot}", page.as_uri())
    with Image.open(shot) as image:
        assert image.size == (1280, 1000)
        # The photos make the page far from a blank or one-colour screen.
        assert max(ImageStat.Stat(image.convert("L")).stddev) > 30
