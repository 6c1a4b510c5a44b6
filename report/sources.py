"""Reading scores for a report: the score CLI's CSV and JSONL, Parquet (a file, or dataset scoring's folder of
them), `artquant eval`'s and `best-of-n`'s folders.

Every reader ends in the same `ScoreTable`: one `ScoreRow` per image (the last row wins when a resumed JSONL
holds a path twice), unscored rows kept as failures with their error, and warnings for what had to be skipped.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

PROBABILITY_PREFIX = "p_"
PATH_KEYS = ("path", "key", "image", "file")  # score CLI / Ray dataset scorer / eval / best-of-n
HUMAN_KEYS = ("gt_score", "human_score")
SUFFIXES = (".csv", ".jsonl", ".parquet")


class ReportInputError(ValueError):
    """A scores or descriptions file that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class ScoreRow:
    path: str  # as the scores file names it
    score: float | None = None  # None when the image was not scored (then `error` says why)
    std: float | None = None
    level_probs: tuple[float | None, ...] = ()  # in `ScoreTable.levels` order
    error: str | None = None
    human_score: float | None = None
    description: str | None = None


@dataclass
class ScoreTable:
    rows: list[ScoreRow]
    levels: tuple[str, ...] = ()
    source: str = ""
    metrics: dict | None = None  # `artquant eval`'s metrics, when the source is an eval report
    title: str = ""
    base_folder: Path | None = None  # where relative image paths are looked up after the working directory
    warnings: list[str] = field(default_factory=list)


def _number(value) -> float | None:
    """A finite float, or None for a missing, empty, NaN or infinite value; ValueError for text that is no number."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _text(value) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value)
    return text if text.strip() else None


def _row_from_record(record: Mapping, levels: tuple[str, ...], where: str) -> ScoreRow:
    path = next((_text(record[k]) for k in PATH_KEYS if _text(record.get(k)) is not None), None)
    if path is None:
        raise ReportInputError(f"{where}: no image path (expected one of the keys {', '.join(PATH_KEYS)}).")
    error = _text(record.get("error"))
    probs = record.get("level_probs")
    if isinstance(probs, Mapping):
        level_probs = tuple(_number(probs.get(level)) for level in levels)
    else:
        level_probs = tuple(_number(record.get(PROBABILITY_PREFIX + level)) for level in levels)
    try:
        score, std = _number(record.get("score")), _number(record.get("std"))
        human = next((_number(record[k]) for k in HUMAN_KEYS if k in record), None)
    except (TypeError, ValueError) as bad:
        return ScoreRow(path, error=f"unreadable number in the scores file ({bad})")
    if error is None and score is None:
        raw = record.get("score")
        missing = raw is None or (isinstance(raw, str) and not raw.strip())
        error = "no score in the scores file" if missing else "score is not finite"
    if error is not None:
        return ScoreRow(path, error=error, human_score=human, description=_text(record.get("description")))
    return ScoreRow(path, score, std, level_probs, None, human, _text(record.get("description")))


def _levels_of(keys: Iterable[str], records: Iterable[Mapping] = ()) -> tuple[str, ...]:
    """Level names from `p_<level>` columns (file order), else from the first `level_probs` mapping."""
    levels = tuple(k[len(PROBABILITY_PREFIX):] for k in keys if k.startswith(PROBABILITY_PREFIX))
    if levels:
        return levels
    for record in records:
        if isinstance(record.get("level_probs"), Mapping):
            return tuple(record["level_probs"])
    return ()


def table_from_records(records: list[Mapping], source: str = "", base_folder: Path | None = None) -> ScoreTable:
    """Rows as the score CLI writes them (path, score, std, p_<level>..., error; None or NaN where missing)."""
    keys = dict.fromkeys(k for record in records for k in record)
    table = ScoreTable([], _levels_of(keys, records), source, base_folder=base_folder)
    by_path: dict[str, ScoreRow] = {}
    for number, record in enumerate(records, start=1):
        try:
            row = _row_from_record(record, table.levels, f"{source or 'rows'} row {number}")
        except ReportInputError as skipped:
            table.warnings.append(str(skipped) + " Skipped.")
            continue
        by_path.pop(row.path, None)  # a resumed run's later row replaces the earlier one, at its new place
        by_path[row.path] = row
    table.rows = list(by_path.values())
    return table


def _csv_text(cell):
    """A CSV cell as the score CLI meant it: it quotes a leading = + - @ with ' (no spreadsheet formulas) and writes
    names with control characters or undecodable bytes as JSON string literals."""
    if not isinstance(cell, str):
        return cell
    if cell[:1] == "'" and cell[1:2] in ("=", "+", "-", "@"):
        return cell[1:]
    if len(cell) > 1 and cell[0] == cell[-1] == '"':
        try:
            text = json.loads(cell)
        except ValueError:
            return cell
        return text if isinstance(text, str) else cell
    return cell


def _read_csv(path: Path) -> tuple[list[dict], list[str]]:
    # surrogateescape: a path that is not UTF-8 survives as the bytes the file system knows it by
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
        reader = csv.DictReader(handle)
        rows = [{key: _csv_text(cell) for key, cell in row.items()} for row in reader]
        columns = list(reader.fieldnames or ())
    if columns and not any(k in columns for k in PATH_KEYS):
        raise ReportInputError(f"{path}: no path column (columns: {', '.join(columns)}); expected 'path'.")
    if columns and "score" not in columns and "error" not in columns:
        raise ReportInputError(f"{path}: no 'score' column (columns: {', '.join(columns)}).")
    return rows, []


def _read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    records, warnings = [], []
    with path.open(encoding="utf-8", errors="surrogateescape") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)  # also reads NaN, which Python's json writes for float('nan')
            except json.JSONDecodeError as bad:
                warnings.append(f"{path} line {number}: not JSON ({bad.msg}), skipped (a torn line from a killed run?).")
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                warnings.append(f"{path} line {number}: not a JSON object, skipped.")
    return records, warnings


def _read_parquet(path: Path) -> tuple[list[dict], list[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as missing:
        raise ReportInputError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from missing
    try:
        return pq.read_table(path).to_pylist(), []
    except Exception as bad:  # pyarrow raises several types for a file that is not Parquet
        raise ReportInputError(f"{path}: not a readable Parquet file ({bad}).") from bad


def _read_parquet_folder(folder: Path) -> ScoreTable:
    """The folder of Parquet files that dataset scoring (`serve/`) writes, one per batch; a half-written file (from
    a kill) is skipped with a warning."""
    records, warnings = [], []
    for file in sorted(folder.glob("*.parquet")):
        try:
            records += _read_parquet(file)[0]
        except ReportInputError as broken:
            warnings.append(f"{broken} Skipped.")
    table = table_from_records(records, str(folder), folder)
    table.warnings[:0] = warnings
    return table


def _read_eval_report(path: Path) -> ScoreTable:
    """`artquant eval`'s report.json: metrics, predictions (image, score, std, gt_score), failed (image, error)."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        predictions, failed = list(report.get("predictions", [])), list(report.get("failed", []))
    except (json.JSONDecodeError, AttributeError, TypeError) as bad:
        raise ReportInputError(f"{path}: not an `artquant eval` report.json ({bad}).") from bad
    table = table_from_records(predictions + failed, str(path), Path.cwd())
    table.metrics = report.get("metrics") if isinstance(report.get("metrics"), dict) else None
    if report.get("undefined"):  # eval's reason for the metrics it left null
        table.warnings.append(f"Metrics shown as n/a: {report['undefined']}.")
    table.title = f"Evaluation of {report.get('model', '?')} on {report.get('data', '?')}"
    return table


def _read_best_of_n(path: Path) -> ScoreTable:
    """`artquant best-of-n`'s scores.json: the prompt and candidates (file, seed, score, std, level_probs, error)."""
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        candidates = list(summary["candidates"])
    except (json.JSONDecodeError, KeyError, TypeError) as bad:
        raise ReportInputError(f"{path}: not a best-of-n scores.json ({bad}).") from bad
    for candidate in candidates:
        if isinstance(candidate, dict) and "seed" in candidate:
            candidate.setdefault("description", f"seed {candidate['seed']}")
    table = table_from_records(candidates, str(path), path.parent)
    table.title = f"Best of {len(candidates)}: {summary.get('prompt', '')}"
    return table


def read_scores(source: str | os.PathLike) -> ScoreTable:
    """A scores file (.csv, .jsonl, .parquet) or a folder written by `artquant eval` (report.json), by
    `artquant best-of-n` (scores.json) or by dataset scoring (.parquet files). Raises `ReportInputError` for what
    cannot be used."""
    path = Path(source)
    if path.is_dir():
        for name, reader in (("report.json", _read_eval_report), ("scores.json", _read_best_of_n)):
            if (path / name).is_file():
                table = reader(path / name)
                break
        else:
            if not any(path.glob("*.parquet")):
                raise ReportInputError(
                    f"{path} is a folder without report.json (artquant eval), scores.json (best-of-n) or .parquet "
                    "files (dataset scoring)."
                )
            table = _read_parquet_folder(path)
    elif not path.exists():
        raise ReportInputError(f"scores file not found: {path}")
    elif path.name in ("report.json", "scores.json"):
        return read_scores(path.parent)
    elif path.suffix.lower() not in SUFFIXES:
        raise ReportInputError(
            f"{path}: unknown format '{path.suffix}'; give a .csv, .jsonl or .parquet scores file, "
            "or the folder of `artquant eval` / `artquant best-of-n`."
        )
    else:
        reader = {".csv": _read_csv, ".jsonl": _read_jsonl, ".parquet": _read_parquet}[path.suffix.lower()]
        records, warnings = reader(path)
        table = table_from_records(records, str(path), path.parent)
        table.warnings[:0] = warnings
    if not table.rows:
        raise ReportInputError(
            f"{path} holds no scored rows: score images first (artquant score IMAGES --out scores.jsonl)."
            + "".join(" " + w for w in table.warnings[:3])
        )
    return table


def merge_descriptions(table: ScoreTable, source: str | os.PathLike) -> int:
    """Adds `artquant describe` output (JSONL of {path, description}) to the rows of the same path; returns how
    many rows got one. Paths match as written, else as resolved files."""
    path = Path(source)
    if not path.is_file():
        raise ReportInputError(f"descriptions file not found: {path} (write one with: artquant describe IMAGES > {path.name})")
    records, warnings = _read_jsonl(path)
    table.warnings += warnings
    texts = {str(r["path"]): str(r["description"]) for r in records if r.get("path") is not None and r.get("description")}
    resolved = {os.path.realpath(p): text for p, text in texts.items()}
    merged = 0
    for index, row in enumerate(table.rows):
        text = texts.get(row.path) or resolved.get(os.path.realpath(row.path))
        if text is not None:
            table.rows[index] = replace(row, description=text)
            merged += 1
    if texts and not merged:
        table.warnings.append(f"{path}: none of its {len(texts)} paths is in the scores; were they written from another folder?")
    return merged
