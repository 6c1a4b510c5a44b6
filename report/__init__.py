"""See the scores: a static HTML report (thumbnails by score, histogram, level probabilities, filters, failures) of
a scores file (.csv, .jsonl, .parquet) or of an `artquant eval` / `artquant best-of-n` folder.

    from artquant.report import write_report
    write_report("scores.jsonl", "report/", descriptions="descriptions.jsonl")   # -> report/index.html

Reads files only: needs Pillow, not torch or transformers (pyarrow for Parquet).
"""

from .page import histogram_svg, scatter_svg, write_report
from .sources import ReportInputError, ScoreRow, ScoreTable, merge_descriptions, read_scores, table_from_records
from .thumbnails import make_thumbnails, thumbnail_name

__all__ = [
    "ReportInputError",
    "ScoreRow",
    "ScoreTable",
    "histogram_svg",
    "make_thumbnails",
    "merge_descriptions",
    "read_scores",
    "scatter_svg",
    "table_from_records",
    "thumbnail_name",
    "write_report",
]
