"""Shared by the report tests: hand-written scores for the fixture's images (no model involved) and page readers."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

LEVELS = ("excellent", "good", "fair", "poor", "bad")
# Hand-written scores for the fixture's images (no model involved); rocket_rgba was "not scored".
SCORES = {
    "astronaut.png": (6.25, 1.5, (0.1, 0.45, 0.3, 0.1, 0.05)),
    "camera.png": (3.5, 0.75, (0.0, 0.05, 0.2, 0.6, 0.15)),
    "chelsea.png": (8.875, 0.625, (0.55, 0.4, 0.05, 0.0, 0.0)),
    "coffee.png": (5.0, 1.25, (0.1, 0.2, 0.4, 0.2, 0.1)),
    "rocket.png": (7.125, 1.0, (0.2, 0.5, 0.2, 0.05, 0.05)),
}
FAILED = {"rocket_rgba.png": "ImageInputError: cannot identify image file"}
EXTERNAL = re.compile(r"https?://|(?:src|href)\s*=\s*[\"']?//|url\(|@import", re.IGNORECASE)


def page_data(page: Path) -> dict:
    """The JSON the page embeds once (what its script draws)."""
    text = page.read_text(encoding="utf-8")
    (payload,) = re.findall(r'<script id="report-data" type="application/json">(.*?)</script>', text, re.S)
    return json.loads(payload)


def full_paths(data: dict) -> list[str]:
    return [data["pathPrefix"] + p for p in data["path"]]


def write_csv(path: Path, rows: list[dict]) -> Path:
    fields = ["path", "score", "std", *(f"p_{n}" for n in LEVELS), "error"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def fixture_rows(images: Path) -> list[dict]:
    rows = []
    for name, (score, std, probs) in SCORES.items():
        rows.append({"path": str(images / name), "score": score, "std": std, **{f"p_{n}": p for n, p in zip(LEVELS, probs)}})
    rows += [{"path": str(images / name), "error": error} for name, error in FAILED.items()]
    return rows
