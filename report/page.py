"""The report page: one static HTML file (inline CSS, JS and SVG; no network) beside its `thumbs/` folder.

The rows go into the page once, as JSON, and `page.js` draws a page of cards at a time; the histogram, and for an
evaluation the scatter of predicted against human scores and the metrics, are drawn here as inline SVG.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import statistics
import sys
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from urllib.parse import quote

from .sources import ReportInputError, ScoreRow, ScoreTable, merge_descriptions, read_scores, table_from_records
from .thumbnails import make_thumbnails

PAGE_NAME = "index.html"
CARDS_PER_PAGE = 120
SCATTER_POINTS = 5000  # more points add bytes, not information
METRIC_NAMES = {
    "n": "images",
    "srcc": "SRCC",
    "plcc": "PLCC",
    "plcc_logistic": "PLCC (logistic fit)",
    "krcc": "KRCC",
    "mae": "MAE",
    "mse": "MSE",
    "level_accuracy": "level accuracy",
}


def _readable(text: str) -> str:
    """Text that encodes as UTF-8: undecodable bytes of a path (surrogate escapes) become U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape" if _escapes_only(text) else "replace").decode("utf-8", "replace")


def _escapes_only(text: str) -> bool:
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _resolve_image(path: str, table: ScoreTable, image_root: Path | None) -> Path:
    """Where a row's image is: absolute as it is; relative under `image_root`, else the working directory, else
    the scores file's folder."""
    image = Path(path)
    if image.is_absolute():
        return image
    if image_root is not None:
        return image_root / image
    if image.exists() or table.base_folder is None:
        return image
    return table.base_folder / image


def _tick_step(span: float) -> float:
    """A round step that gives between 4 and 12 ticks over `span`."""
    for step in (0.1, 0.25, 0.5, 1, 2, 2.5, 5, 10, 20, 25, 50, 100):
        if span / step <= 12:
            return step
    return 10 ** math.ceil(math.log10(span / 10))


def _score_range(values: Sequence[float]) -> tuple[float, float, float]:
    """(low, high, bin width) with round edges around `values`, 20 to 50 bins."""
    low, high = math.floor(min(values)), math.ceil(max(values))
    high = max(high, low + 1)
    width = next(w for w in (0.05, 0.1, 0.2, 0.25, 0.5, 1, 2, 5, 10, 25, 50, 100) if (high - low) / w <= 50)
    return low, high, width


def _number_label(value: float) -> str:
    return f"{value:g}"


def histogram_svg(scores: Sequence[float], human: Sequence[float] = ()) -> str:
    """Inline SVG: bars of `scores` (each a `<rect class="bin" data-lo data-hi>`), `human` as an outline."""
    low, high, width = _score_range(list(scores) + list(human))
    bins = max(1, round((high - low) / width))
    counts, human_counts = [0] * bins, [0] * bins
    for values, into in ((scores, counts), (human, human_counts)):
        for value in values:
            into[min(bins - 1, max(0, int((value - low) / width)))] += 1
    view_w, view_h, left, bottom, top = 720, 190, 40, 24, 8
    plot_w, plot_h = view_w - left - 8, view_h - bottom - top
    tallest = max(counts + human_counts) or 1
    bar_w = plot_w / bins
    parts = [f'<svg viewBox="0 0 {view_w} {view_h}" role="img" aria-label="histogram of scores">']
    for k, n in enumerate(counts):
        edge_lo, edge_hi = low + k * width, low + (k + 1) * width
        h = plot_h * n / tallest
        parts.append(
            f'<rect class="bin" data-lo="{_number_label(round(edge_lo, 6))}" data-hi="{_number_label(round(edge_hi, 6))}" '
            f'data-count="{n}" x="{left + k * bar_w + 0.5:.1f}" y="{top + plot_h - h:.1f}" width="{max(bar_w - 1, 0.5):.1f}" '
            f'height="{h:.1f}"><title>{edge_lo:g} to {edge_hi:g}: {n} image(s)</title></rect>'
        )
    if human:
        points = " ".join(
            f"{left + k * bar_w:.1f},{top + plot_h - plot_h * n / tallest:.1f} {left + (k + 1) * bar_w:.1f},{top + plot_h - plot_h * n / tallest:.1f}"
            for k, n in enumerate(human_counts)
        )
        parts.append(f'<polyline class="human" points="{points}"><title>human scores</title></polyline>')
    parts.append(f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}"/>')
    step = _tick_step(high - low)
    tick = math.ceil(low / step) * step
    while tick <= high + 1e-9:
        x = left + (tick - low) / (high - low) * plot_w
        parts.append(f'<line class="axis" x1="{x:.1f}" y1="{top + plot_h}" x2="{x:.1f}" y2="{top + plot_h + 4}"/>')
        parts.append(f'<text x="{x:.1f}" y="{view_h - 6}" text-anchor="middle">{_number_label(round(tick, 6))}</text>')
        tick += step
    parts.append(f'<text x="{left - 6}" y="{top + 9}" text-anchor="end">{tallest}</text>')
    parts.append(f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end">0</text>')
    parts.append("</svg>")
    return "".join(parts)


def scatter_svg(predicted: Sequence[float], human: Sequence[float]) -> str:
    """Inline SVG: predicted (y) against human (x) scores with the diagonal; at most SCATTER_POINTS points."""
    low, high, _ = _score_range(list(predicted) + list(human))
    size, margin = 320, 38
    plot = size - margin - 8

    def x(value: float) -> float:
        return margin + (value - low) / (high - low) * plot

    def y(value: float) -> float:
        return 8 + plot - (value - low) / (high - low) * plot

    every = max(1, math.ceil(len(predicted) / SCATTER_POINTS))
    parts = [f'<svg viewBox="0 0 {size} {size}" role="img" aria-label="predicted against human scores">']
    parts.append(f'<line class="diagonal" x1="{x(low):.1f}" y1="{y(low):.1f}" x2="{x(high):.1f}" y2="{y(high):.1f}"/>')
    parts.append(f'<line class="axis" x1="{margin}" y1="{8 + plot}" x2="{margin + plot}" y2="{8 + plot}"/>')
    parts.append(f'<line class="axis" x1="{margin}" y1="8" x2="{margin}" y2="{8 + plot}"/>')
    parts += [
        f'<circle class="point" cx="{x(h):.1f}" cy="{y(p):.1f}" r="2.2"/>'
        for p, h in list(zip(predicted, human))[::every]
    ]
    step = _tick_step(high - low)
    tick = math.ceil(low / step) * step
    while tick <= high + 1e-9:
        label = _number_label(round(tick, 6))
        parts.append(f'<text x="{x(tick):.1f}" y="{size - 16}" text-anchor="middle">{label}</text>')
        parts.append(f'<text x="{margin - 4}" y="{y(tick) + 4:.1f}" text-anchor="end">{label}</text>')
        tick += step
    parts.append(f'<text x="{margin + plot / 2:.0f}" y="{size - 2}" text-anchor="middle">human score</text>')
    parts.append(f'<text x="10" y="{8 + plot / 2:.0f}" text-anchor="middle" transform="rotate(-90 10 {8 + plot / 2:.0f})">predicted</text>')
    parts.append("</svg>")
    note = f" ({len(predicted[::every])} of {len(predicted)} shown)" if every > 1 else ""
    return f'<figure class="scatter">{"".join(parts)}<figcaption>Predicted against human scores{note}.</figcaption></figure>'


def _metrics_html(metrics: Mapping) -> str:
    rows = []
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, type(None))):
            continue
        if value is None or (isinstance(value, float) and not math.isfinite(value)):  # undefined (eval writes null)
            shown = "n/a"
        else:
            shown = f"{value:,}" if isinstance(value, int) else f"{value:.4f}"
        rows.append(f"<tr><th>{html.escape(METRIC_NAMES.get(key, key))}</th><td data-metric=\"{html.escape(key)}\">{shown}</td></tr>")
    return f'<table class="metrics"><caption>Against the human scores</caption>{"".join(rows)}</table>'


def _summary_html(scored: Sequence[ScoreRow], failed: Sequence[ScoreRow], folder: str, warnings: Sequence[str]) -> str:
    parts = [f"<b>{len(scored):,}</b> image(s) scored, <b>{len(failed):,}</b> not scored"]
    if scored:
        values = [r.score for r in scored]
        best, worst = max(scored, key=lambda r: r.score), min(scored, key=lambda r: r.score)
        parts += [
            f"mean <b>{statistics.fmean(values):.3f}</b>, median <b>{statistics.median(values):.3f}</b>",
            f"best <b>{best.score:.3f}</b> {html.escape(_readable(best.path)[len(folder):])}",
            f"worst <b>{worst.score:.3f}</b> {html.escape(_readable(worst.path)[len(folder):])}",
        ]
        if folder:
            parts.append(f'paths below under <span class="prefix">{html.escape(folder)}</span>')
    text = f'<p class="summary">{" · ".join(parts)}</p>'
    if warnings:
        text += '<ul class="warnings">' + "".join(f"<li>{html.escape(_readable(w))}</li>" for w in warnings) + "</ul>"
    return text


def _links(images: Sequence[Path | None], out: Path) -> tuple[str, list[str | None]]:
    """Relative URLs from the report to the images: a shared base (the images' common folder) and per-image rests."""
    present = [os.path.abspath(i) for i in images if i is not None]
    if not present:
        return "", [None] * len(images)
    common = os.path.commonpath(present) if len(present) > 1 else os.path.dirname(present[0])
    if len(present) > 1 and common in present:  # one image's own path: use its folder
        common = os.path.dirname(common)
    base = os.path.relpath(common, os.path.abspath(out))
    base_url = "" if base == "." else quote(os.fsencode(base).decode("utf-8", "surrogateescape").replace(os.sep, "/"), safe="/") + "/"

    def rest(image: Path | None) -> str | None:
        if image is None:
            return None
        relative = os.path.relpath(os.path.abspath(image), common).replace(os.sep, "/")
        return quote(os.fsencode(relative), safe="/")

    return base_url, [rest(i) for i in images]


def _common_folder(paths: Sequence[str]) -> str:
    """The leading folder ("a/b/") that all `paths` share, as text; written once instead of per row."""
    prefix = os.path.commonprefix(list(paths)) if paths else ""
    folder = prefix[: prefix.rfind("/") + 1]
    return folder if folder.strip("/.") else ""  # "/" alone would only hide the root from every path


def _page_data(table: ScoreTable, scored: list[ScoreRow], failed: list[ScoreRow], paths, folder, thumbs, links, base_url) -> dict:
    data = {
        "levels": list(table.levels),
        "pageSize": CARDS_PER_PAGE,
        "pathPrefix": folder,
        "path": [p[len(folder):] for p in paths],
        "score": [_rounded(r.score) for r in scored],
        "std": [_rounded(r.std) for r in scored],
        "thumb": [None if t is None else t.removeprefix("thumbs/").removesuffix(".jpg") for t in thumbs],
        "linkBase": base_url,
        "link": links,
        "failures": [[_readable(r.path), _readable(r.error or "")] for r in failed],
    }
    if table.levels and any(any(p is not None for p in r.level_probs) for r in scored):
        data["probs"] = [[_rounded(p) for p in r.level_probs] for r in scored]
    if any(r.human_score is not None for r in scored):
        data["human"] = [_rounded(r.human_score) for r in scored]
    if any(r.description for r in scored):
        data["description"] = [None if r.description is None else _readable(r.description) for r in scored]
    return data


def _embedded_json(data: dict) -> str:
    """JSON safe inside <script>: no '<' (so no '</script>' or '<!--'), no NaN."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def _fill(template: str, values: Mapping[str, str]) -> str:
    """One pass over `{{name}}` placeholders, so text inserted for one is never read as another."""
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], template)


def write_report(
    source: str | os.PathLike | ScoreTable | Sequence[Mapping],
    out: str | os.PathLike,
    descriptions: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    thumbnail_size: int = 256,
    title: str | None = None,
    progress: bool = False,
) -> Path:
    """Writes `out/index.html` and `out/thumbs/` for a scores file or folder (see `read_scores`), a `ScoreTable`,
    or rows as the score CLI writes them; returns the page's path. Raises `ReportInputError` for unusable input."""
    if isinstance(source, ScoreTable):
        table = source
    elif isinstance(source, (str, os.PathLike)):
        table = read_scores(source)
    else:
        table = table_from_records(list(source))
    if descriptions is not None:
        merge_descriptions(table, descriptions)
    if thumbnail_size < 16:
        raise ReportInputError(f"the thumbnail size must be at least 16 pixels, not {thumbnail_size}.")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    # Best first, as the page opens: the embedded order is the default view's order.
    scored = sorted((r for r in table.rows if r.error is None), key=lambda r: -r.score)
    failed = [r for r in table.rows if r.error is not None]
    images = [_resolve_image(r.path, table, Path(image_root) if image_root else None) for r in scored]

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(images), unit="img", desc="thumbnails", file=sys.stderr)
    thumbs, unreadable = make_thumbnails(images, folder, thumbnail_size, progress=bar.update if bar else None)
    if bar is not None:
        bar.close()
    warnings = list(table.warnings)
    missing = sum(t is None for t in thumbs) - len(unreadable)
    if missing:
        warnings.append(f"{missing:,} image file(s) not found (shown as placeholders); pass --image-root if the paths are relative to another folder.")
    warnings += [f"{image}: cannot make a thumbnail ({error})" for image, error in list(unreadable.items())[:20]]
    if len(unreadable) > 20:
        warnings.append(f"... and {len(unreadable) - 20} more unreadable image(s).")
    base_url, links = _links([i if t is not None else None for i, t in zip(images, thumbs)], folder)

    paths = [_readable(r.path) for r in scored]
    shared_folder = _common_folder(paths)
    human = [r.human_score for r in scored if r.human_score is not None]
    paired = [(r.score, r.human_score) for r in scored if r.human_score is not None]
    evaluation = ""
    if table.metrics:
        evaluation += _metrics_html(table.metrics)
    if paired:
        evaluation += scatter_svg([p for p, _ in paired], [h for _, h in paired])
    sort_options = [("score", "score"), ("std", "uncertainty (std)"), ("name", "path")]
    if human:
        sort_options.insert(1, ("human", "human score"))
    page_title = title or table.title or (f"Scores: {Path(table.source).name}" if table.source else "Scores")
    values = {
        "title": html.escape(_readable(page_title)),
        "source": html.escape(_readable(table.source)),
        "summary": _summary_html(scored, failed, shared_folder, warnings),
        "evaluation": evaluation,
        "histogram": histogram_svg([r.score for r in scored], human) if scored else "<p>No image was scored.</p>",
        "histogram_note": ' (<span class="legend-predicted">predicted</span>, <span class="legend-human">human</span> as outline)' if human else "",
        "sort_options": "".join(f'<option value="{k}">{label}</option>' for k, label in sort_options),
        "style": _asset("page.css"),
        "script": _asset("page.js"),
        "data": _embedded_json(_page_data(table, scored, failed, paths, shared_folder, thumbs, links, base_url)),
    }
    page = folder / PAGE_NAME
    page.write_text(_fill(_asset("page.html"), values), encoding="utf-8")
    return page


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
