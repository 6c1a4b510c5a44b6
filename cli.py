"""`artquant score | describe | convert | train | eval | best-of-n`."""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import json
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path

RESULT_FIELDS = ("path", "score", "std", "error")
DTYPE_HELP = "auto (default: bf16 on a GPU, fp32 on the CPU), fp32/float32, fp16/float16 or bf16/bfloat16"
COMPILE_HELP = "torch.compile the vision tower and the LLM's layers (minutes at start; pays off over many batches on a GPU)"
MAX_PIXELS_HELP = "refuse (as a per-image error) images with more pixels (default: PIL's bomb limit, 178956970)"
DEFAULT_PRESET = "artquant"
# Written out because reading PRESETS imports torch, which `--help` must not; tests/test_cli.py checks it is complete.
PRESET_HELP = ("artquant (default, 1..10), deqa-score, onealign-quality, onealign-aesthetics (1..5), "
               "qrealign-{mini,lite,pro}-{quality,aesthetics} (Q-ReAlign on Qwen3.5-VL, 0..1)")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint folder or Hugging Face id (default: the preset's)")
    parser.add_argument("--base", help="base model for a LoRA release (default: the release's, else the preset's)")
    parser.add_argument("--preset", default=DEFAULT_PRESET, type=_preset_name, help=PRESET_HELP)
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", type=_dtype_name, help=DTYPE_HELP)


def _checked_by_core(default: str, module: str, parser: str):
    """An argparse type: a value checked by the core's own parser, so the CLI takes exactly what `from_pretrained`
    takes, and refuses anything else with the core's message. The default is taken unchecked: argparse converts it
    on every run, and the core (torch) must not be imported for it."""

    def checked(text: str) -> str:
        if text == default:
            return text
        try:
            getattr(importlib.import_module(module, __package__), parser)(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text

    return checked


_dtype_name = _checked_by_core("auto", ".scorer.checkpoint", "parse_dtype")
_preset_name = _checked_by_core(DEFAULT_PRESET, ".scorer.presets", "get_preset")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def _batch_size(text: str) -> int | str:
    """A --batch-size value: a positive integer or "auto"."""
    try:
        return text if text == "auto" else _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a positive integer or auto, not {text!r}") from None


def _load_scorer(args):
    from .scorer import ArtQuantScorer

    try:
        return ArtQuantScorer.from_pretrained(
            args.model, base=args.base, preset=args.preset, dtype=args.dtype, device=args.device,
            compile=getattr(args, "compile", False),
        )
    except ValueError as error:  # arguments that do not go together (e.g. --base with a Q-ReAlign preset)
        raise UsageError(str(error)) from None


class OutputError(Exception):
    """An output file that cannot be used (wrong suffix, unwritable, locked by another run): exit code 2."""


class UsageError(Exception):
    """Arguments the model loader refuses together (the message says which): exit code 2."""


def _shown(text: str) -> str:
    """`text` on one line of valid UTF-8: a name with a tab, newline or other control character, undecodable bytes
    (non-UTF-8 file names) or a leading double quote is shown as a JSON string literal instead, so rows stay
    unambiguous."""
    return text if text.isprintable() and not text.startswith('"') else json.dumps(text)


def _csv_cell(value):
    """A CSV cell that a spreadsheet shows as text: a leading = + - @ (a formula) gets a quote mark in front."""
    if not isinstance(value, str):
        return value
    value = _shown(value)
    return "'" + value if value.startswith(("=", "+", "-", "@")) else value


def _image_paths(arguments: list[str], failures: list[tuple[str, str]]) -> list[str]:
    """Absolute, normalised paths of the images under `arguments` (files as given, folders recursed), each once:
    `dir` and `/abs/dir` name the same images. Folders that cannot be listed go to `failures` as (path, message)."""
    from .scorer.images import iter_image_files

    def unlistable(folder: Path, error: OSError) -> None:
        reason = error.strerror or str(error)
        failures.append((os.path.abspath(folder), f"{folder}: cannot list the folder ({reason}); its images were not scored."))

    return list(dict.fromkeys(os.path.abspath(path) for path in iter_image_files(arguments, on_error=unlistable)))


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _done_paths(lines: Iterable[bytes]) -> set[str]:
    """Images already scored in a JSONL file of an earlier run, as absolute paths. Torn lines (a kill), foreign
    lines and rows without a finite score are ignored: those images are scored again."""
    done = set()
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # also UnicodeDecodeError
            continue
        if isinstance(row, dict) and isinstance(row.get("path"), str) and row.get("error") is None \
                and _finite_number(row.get("score")):
            done.add(os.path.abspath(row["path"]))
    return done


def _lock(handle, out: Path) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; two runs on one file are the user's to avoid
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise OutputError(f"{out} is being written by another artquant process; wait for it to finish or choose "
                          "another --out.") from None


class ResultWriter:
    """Rows to stdout, CSV or JSONL, each batch written and flushed as soon as it is scored, so a kill loses
    nothing finished. The file is checked, opened and locked before the model loads. JSONL appends and resumes (a
    rerun skips images already scored); CSV is rewritten from the first finished batch on (an earlier CSV survives
    a run that fails before scoring anything). Numbers that are not finite are written as null/empty, never NaN."""

    def __init__(self, out: Path | None, level_names: tuple[str, ...]):
        self.out, self.fields = out, [*RESULT_FIELDS[:3], *(f"p_{n}" for n in level_names), "error"]
        self.rows: list[dict] = []
        self.done: set[str] = set()
        self.handle = None
        self.started = False
        if out is None:
            return
        if out.suffix not in (".csv", ".jsonl"):
            raise OutputError(f"--out must end in .csv or .jsonl, not {_shown(out.name)}.")
        if out.is_dir():
            raise OutputError(f"--out {_shown(str(out))} is a folder; name a .csv or .jsonl file.")
        existed = out.exists()
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            self.handle = out.open("ab+")
        except OSError as error:
            raise OutputError(f"cannot write --out {_shown(str(out))} ({error.strerror or error}); choose a writable "
                              "folder.") from None
        self.created = not existed
        _lock(self.handle, out)
        if out.suffix == ".jsonl":
            self.handle.seek(0)
            self.done = _done_paths(self.handle)
            self.handle.seek(0, os.SEEK_END)
            if self.handle.tell():
                self.handle.seek(-1, os.SEEK_END)
                if self.handle.read(1) != b"\n":  # a killed run's half-written line stays on its own line
                    self._write("\n")

    def _write(self, text: str) -> None:
        try:
            self.handle.write(text.encode("utf-8"))
        except OSError as error:
            raise OutputError(f"writing {_shown(str(self.out))} failed ({error.strerror or error}); the rows written "
                              "before it are kept (a .jsonl run resumes from them).") from None

    def add(self, path: str, result) -> None:
        """One scored (or failed) image, as an `ImageScore`."""
        probs = {f"p_{k}": v for k, v in result.level_probs.items()}
        self.add_row({"path": path, "score": result.score, "std": result.std, **probs, "error": result.error})

    def add_failure(self, path: str, message: str) -> None:
        self.add_row({"path": path, "error": message})

    def add_row(self, values: dict) -> None:
        row = {f: values.get(f) for f in self.fields}
        if row["error"] is not None:  # a failed row holds no numbers
            row = {f: row[f] if f in ("path", "error") else None for f in self.fields}
        row = {f: None if isinstance(v, float) and not math.isfinite(v) else v for f, v in row.items()}
        self.rows.append(row)
        if self.out is None:
            shown = "error: " + _shown(row["error"]) if row["error"] else f"{row['score']:.4f} ± {row['std']:.4f}"
            print(f"{_shown(row['path'])}\t{shown}")
        elif self.out.suffix == ".jsonl":
            self._write(json.dumps(row, allow_nan=False) + "\n")
        else:
            if not self.started:
                self.handle.truncate(0)
                self._write(self._csv_line(self.fields))
            self._write(self._csv_line([_csv_cell(row[f]) for f in self.fields]))
        self.started = True

    @staticmethod
    def _csv_line(cells: list) -> str:
        line = io.StringIO()
        csv.writer(line).writerow(cells)
        return line.getvalue()

    def flush(self) -> None:
        if self.handle is not None:
            try:
                self.handle.flush()
            except OSError as error:
                raise OutputError(f"writing {_shown(str(self.out))} failed ({error.strerror or error}).") from None
        sys.stdout.flush()

    def close(self) -> None:
        if self.handle is None:
            return
        self.handle.close()
        if self.created and not self.started:  # nothing was scored: leave no empty file behind
            self.out.unlink(missing_ok=True)


def _summary(rows: list[dict], skipped: int) -> str:
    scored = [r for r in rows if r["error"] is None]
    failed = [r for r in rows if r["error"] is not None]
    lines = [f"scored {len(scored)} image(s), {len(failed)} failed" + (f", {skipped} already done" if skipped else "")]
    if scored:
        best = max(scored, key=lambda r: r["score"])
        worst = min(scored, key=lambda r: r["score"])
        mean = sum(r["score"] for r in scored) / len(scored)
        lines += [f"mean {mean:.3f}", f"best {best['score']:.3f}  {_shown(best['path'])}",
                  f"worst {worst['score']:.3f}  {_shown(worst['path'])}"]
    lines += [f"failed: {_shown(r['error'])}" for r in failed]
    return "\n".join(lines)


def _apply_pixel_limit(args) -> int:
    """The --max-pixels limit (default: PIL's bomb limit). The scorer refuses larger images itself, one by one, from
    their header; PIL's own refusal is moved up to a larger limit (never down) and its warning silenced."""
    import warnings

    from PIL import Image

    from .scorer.images import DEFAULT_MAX_PIXELS

    limit = DEFAULT_MAX_PIXELS if args.max_pixels is None else args.max_pixels
    if limit < 1:
        raise OutputError(f"--max-pixels must be at least 1, got {limit}.")
    if Image.MAX_IMAGE_PIXELS is not None and limit > 2 * Image.MAX_IMAGE_PIXELS:  # PIL refuses over twice its limit
        Image.MAX_IMAGE_PIXELS = (limit + 1) // 2
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    return limit


def command_score(args) -> int:
    if args.engine == "ray":
        if args.batch_size == "auto" or args.compile:
            raise SystemExit("--batch-size auto and --compile apply to --engine local; give --engine ray a number.")
        return command_score_ray(args)
    from tqdm import tqdm

    from .scorer.presets import get_preset

    max_pixels = _apply_pixel_limit(args)
    out = Path(args.out) if args.out else None
    writer = ResultWriter(out, get_preset(args.preset).level_names)  # checked and locked before the model loads
    try:
        failures: list[tuple[str, str]] = []
        paths = _image_paths(args.paths, failures)
        todo = [p for p in paths if p not in writer.done]
        if not paths and not failures:
            print("no images found under " + " ".join(map(_shown, args.paths)), file=sys.stderr)
            return 1
        if not todo and not failures:
            print(f"all {len(paths)} image(s) already scored in {_shown(str(out))}", file=sys.stderr)
            return 0
        for folder, message in failures:
            writer.add_failure(folder, message)
        scorer = _load_scorer(args) if todo else None
        if scorer is not None and args.batch_size == "auto":
            args.batch_size = scorer.largest_batch_size()
        with tqdm(total=len(todo), unit="img", desc="scoring", disable=args.quiet) as bar:
            batches = scorer.score_batches(
                todo, batch_size=args.batch_size, max_pixels=max_pixels, workers=args.workers
            ) if todo else []
            for start, results in zip(range(0, len(todo), args.batch_size), batches):
                for path, result in zip(todo[start : start + args.batch_size], results):
                    writer.add(path, result)
                writer.flush()
                bar.update(len(results))
        writer.flush()
    finally:
        writer.close()
    print(_summary(writer.rows, len(paths) - len(todo)), file=sys.stderr)
    if args.report and _write_report(out or writer.rows, args.report) != 0:
        return 2
    return 0 if all(r["error"] is None for r in writer.rows) else 1


def _write_report(source, folder: str, **options) -> int:
    from .report import ReportInputError, write_report

    try:
        page = write_report(source, folder, progress=True, **options)
    except ReportInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"report written to {page}", file=sys.stderr)
    return 0


def command_report(args) -> int:
    return _write_report(args.scores, args.out, descriptions=args.descriptions, image_root=args.image_root,
                         thumbnail_size=args.thumbnail_size, title=args.title)


def _json_line(row: dict) -> str:
    """A JSON line, readable where it can be: names with undecodable bytes (non-UTF-8) are written with escapes."""
    line = json.dumps(row, ensure_ascii=False)
    return line if line.isprintable() else json.dumps(row)


def command_describe(args) -> int:
    max_pixels = _apply_pixel_limit(args)
    failures: list[tuple[str, str]] = []
    paths = _image_paths(args.paths, failures)
    if not paths and not failures:
        print("no images found under " + " ".join(map(_shown, args.paths)), file=sys.stderr)
        return 1
    for folder, message in failures:
        print(_json_line({"path": folder, "description": None, "error": message}), flush=True)
    scorer = _load_scorer(args) if paths else None
    failed = len(failures)
    for path in paths:  # one line per image as soon as it is described
        text = scorer.describe([path], question=args.question, max_new_tokens=args.max_new_tokens, max_pixels=max_pixels)[0]
        error = text[len("[error: ") : -1] if text.startswith("[error: ") and text.endswith("]") else None
        failed += error is not None
        print(_json_line({"path": path, "description": None if error else text, "error": error}), flush=True)
    return 1 if failed else 0


def _check_new_folder(out: Path) -> None:
    """--out of `convert`: a new or empty folder in a writable place, checked before the model loads."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {_shown(str(out))} is a file; name a new folder.")
    if out.is_dir() and any(out.iterdir()):
        raise OutputError(f"--out {_shown(str(out))} is a folder that is not empty; name a new or empty folder, so "
                          "that no file of another checkpoint is mixed in or overwritten.")
    parent = next(p for p in (out, *out.parents) if p.exists())
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write --out {_shown(str(out))}: {_shown(str(parent))} is not writable.")


def command_convert(args) -> int:
    _check_new_folder(Path(args.out))
    scorer = _load_scorer(args)
    scorer.save_pretrained(args.out)
    print(f"wrote a merged safetensors checkpoint to {args.out}", file=sys.stderr)
    return 0


def command_train(args) -> int:
    from .training import run_training

    return run_training(args.config, args.overrides)


def command_eval(args) -> int:
    from .training import run_evaluation

    return run_evaluation(
        args.model or None, args.data, base=args.base, out=args.out, image_folder=args.image_folder,
        batch_size=args.batch_size, preset=args.preset, device=args.device, dtype=args.dtype, plots=not args.no_plots,
        score_range=args.score_range,
    )


def command_best_of_n(args) -> int:
    from .reward import best_of_n_to_folder
    from .reward.best_of_n import parse_pipe_args
    from .scorer.checkpoint import parse_dtype

    pipeline_options = {
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "negative_prompt": args.negative_prompt,
        "height": args.height,
        "width": args.width,
    }
    pipeline_options = {k: v for k, v in pipeline_options.items() if v is not None}
    try:
        passed_through = parse_pipe_args(args.pipe_arg)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if twice := sorted(set(passed_through) & set(pipeline_options)):
        print(f"error: {', '.join(twice)} given both as an option and as --pipe-arg; give it once.", file=sys.stderr)
        return 2
    try:
        summary = best_of_n_to_folder(
            args.pipeline,
            args.prompt,
            args.n,
            args.out,
            (lambda: _load_scorer(args)) if args.offload else _load_scorer(args),
            batch_size=args.batch_size,
            seed=args.seed,
            device=args.device,
            torch_dtype=parse_dtype(args.pipeline_dtype),
            offload=args.offload,
            **pipeline_options,
            **passed_through,
        )
    except (ValueError, TypeError) as error:  # arguments the pipeline refuses or would silently ignore
        print(f"error: {error}", file=sys.stderr)
        return 2
    best = summary["candidates"][0]
    print(f"best of {len(summary['candidates'])}: seed {best['seed']}, score {best['score']:.3f} -> {args.out}", file=sys.stderr)
    return 0 if all(c["error"] is None for c in summary["candidates"]) else 1


def command_score_ray(args) -> int:
    """`score --engine ray`: the same scores on Ray Data, into a folder of Parquet files (resumable)."""
    from .serve.dataset import score_dataset

    if not args.out or Path(args.out).suffix != ".parquet":
        raise SystemExit("--engine ray writes Parquet: pass --out scores.parquet (a folder of Parquet files).")
    max_pixels = _apply_pixel_limit(args)
    try:
        summary = score_dataset(
            args.paths, args.out, model=args.model, base=args.base, preset=args.preset, dtype=args.dtype,
            batch_size=args.batch_size, actors=args.actors, image_column=args.image_column, key_column=args.key_column,
            max_pixels=max_pixels,
        )
    except ValueError as error:  # a source that cannot be scored, or options that do not go together (DatasetSourceError)
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"scored {summary['scored']} image(s), {summary['failed']} failed, {summary['already_done']} already done"
        + (f", removed {summary['removed_partial_files']} half-written file(s)" if summary["removed_partial_files"] else "")
        + f" -> {args.out}",
        file=sys.stderr,
    )
    return 0 if summary["failed"] == 0 else 1


def command_serve(args) -> int:
    from .serve.server import run_server

    app_args = {
        "model": args.model, "base": args.base, "preset": args.preset, "dtype": args.dtype, "device": args.device,
        "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout,
        "max_images": args.max_images, "max_bytes": args.max_bytes, "max_pixels": args.max_pixels,
    }
    try:
        run_server(
            app_args, host=args.host, port=args.port, replicas=args.replicas, cpus_per_replica=args.cpus_per_replica,
            gpus_per_replica=args.gpus_per_replica,
            max_ongoing_requests=args.max_ongoing_requests, max_queued_requests=args.max_queued_requests,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="artquant", description="ArtQuant aesthetic scoring")
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser("score", help="score images (files or folders, recursed)")
    score.add_argument("paths", nargs="+")
    _add_model_arguments(score)
    score.add_argument("--batch-size", type=_batch_size, default=8,
                       help="images per model call, or auto: the largest that fits on a CUDA GPU (found at start), 8 on the CPU")
    score.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    score.add_argument("--workers", type=_positive_int, help="threads that decode and preprocess images while the model "
                       "runs (default: one per CPU, at most 8)")
    score.add_argument("--out", help="results.csv or results.jsonl (JSONL resumes: a rerun skips scored images)")
    score.add_argument("--quiet", action="store_true", help="no progress bar")
    score.add_argument("--max-pixels", type=int, help=MAX_PIXELS_HELP)
    score.add_argument("--report", metavar="DIR", help="also write an HTML report of the scores into DIR (see artquant report)")
    score.add_argument("--engine", choices=["local", "ray"], default="local",
                       help="ray: Ray Data over image folders, .parquet and WebDataset .tar sources (RAY_ADDRESS for a cluster); --out a .parquet folder")
    score.add_argument("--actors", type=int, help="--engine ray: model actors (default: one per GPU, else one)")
    score.add_argument("--image-column", help="--engine ray: image-bytes column of Parquet sources (default: image, jpg, png, ...)")
    score.add_argument("--key-column", help="--engine ray: key column of Parquet sources (default: key, __key__, id, path)")
    score.set_defaults(run=command_score)

    report = commands.add_parser("report", help="a static HTML page of scores: thumbnails by score, histogram, filters")
    report.add_argument("scores", help="scores .csv, .jsonl or .parquet, or the folder of artquant eval, best-of-n or dataset scoring")
    report.add_argument("--out", default="artquant-report", help="folder for index.html and thumbs/ (default: artquant-report)")
    report.add_argument("--descriptions", help="JSONL written by artquant describe, shown beside the images")
    report.add_argument("--image-root", help="folder the relative image paths are under (default: the working directory, else the scores file's folder)")
    report.add_argument("--thumbnail-size", type=int, default=256, help="longest side of the thumbnails in pixels (default 256)")
    report.add_argument("--title", help="page title (default: from the scores file)")
    report.set_defaults(run=command_report)

    describe = commands.add_parser("describe", help="generate aesthetic descriptions")
    describe.add_argument("paths", nargs="+")
    _add_model_arguments(describe)
    describe.add_argument("--question", help="default: the preset's description question")
    describe.add_argument("--max-new-tokens", type=int, default=256)
    describe.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    describe.add_argument("--max-pixels", type=int, help=MAX_PIXELS_HELP)
    describe.set_defaults(run=command_describe)

    convert = commands.add_parser("convert", help="write a merged safetensors checkpoint (no peft, no pickle)")
    _add_model_arguments(convert)
    convert.add_argument("--out", required=True, help="output folder")
    convert.set_defaults(run=command_convert)

    train = commands.add_parser("train", help="RAD-based fine-tuning from a YAML config (runs under accelerate launch)")
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs=argparse.REMAINDER, help="key=value pairs that override the config")
    train.set_defaults(run=command_train)

    evaluate = commands.add_parser("eval", help="SRCC, PLCC, MAE, MSE, level accuracy, plots and a JSON report")
    _add_model_arguments(evaluate)
    evaluate.add_argument("--data", required=True,
                          help="JSON list of {image, gt_score}, the reference's score JSON, or CSV/JSONL of image, score")
    evaluate.add_argument("--score-range", nargs=2, type=float, metavar=("LOW", "HIGH"),
                          help="the data's score scale when it is not the preset's (1..10 for artquant, 0..1 for qrealign-*); rescaled linearly")
    evaluate.add_argument("--image-folder", default="", help="folder the data's image paths are relative to")
    evaluate.add_argument("--out", default="artquant-eval", help="folder for report.json, scatter.png, histogram.png")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--no-plots", action="store_true")
    evaluate.set_defaults(run=command_eval)

    best_of_n = commands.add_parser("best-of-n", help="generate n images with a diffusers pipeline, keep them ranked")
    _add_model_arguments(best_of_n)
    best_of_n.add_argument("--pipeline", required=True, help="diffusers pipeline folder or Hugging Face id")
    best_of_n.add_argument("--prompt", required=True)
    best_of_n.add_argument("--n", type=int, default=8, help="number of candidates")
    best_of_n.add_argument("--out", required=True, help="output folder (images, scores.json, contact_sheet.png)")
    best_of_n.add_argument("--seed", type=int, default=0, help="first seed; candidate k uses seed + k")
    best_of_n.add_argument("--batch-size", type=int, default=4, help="images per pipeline call")
    best_of_n.add_argument("--steps", type=int, help="num_inference_steps (the pipeline's default if unset)")
    best_of_n.add_argument("--guidance-scale", type=float)
    best_of_n.add_argument("--negative-prompt")
    best_of_n.add_argument("--height", type=int)
    best_of_n.add_argument("--width", type=int)
    best_of_n.add_argument("--pipeline-dtype", type=_dtype_name, help="the pipeline's dtype: " + DTYPE_HELP)
    best_of_n.add_argument(
        "--pipe-arg", action="append", default=[], metavar="KEY=VALUE",
        help="any other pipeline argument, repeatable; values read as JSON (e.g. true_cfg_scale=4, max_sequence_length=256)",
    )  # fmt: skip
    best_of_n.add_argument(
        "--offload", action="store_true",
        help="generate, release the pipeline, then load the scorer and score: the two never share memory",
    )  # fmt: skip
    best_of_n.set_defaults(run=command_best_of_n)

    serve_parser = commands.add_parser("serve", help="an HTTP reward server on Ray Serve (batched across clients)")
    _add_model_arguments(serve_parser)
    serve_parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; any other needs $ARTQUANT_SERVE_TOKEN)")
    serve_parser.add_argument("--port", type=int, default=8000)
    serve_parser.add_argument("--replicas", type=int, help="model replicas (default: one per GPU, else one on the CPU)")
    serve_parser.add_argument("--cpus-per-replica", type=float, default=1, help="CPUs each CPU replica holds (default 1)")
    serve_parser.add_argument("--gpus-per-replica", type=float, default=1, help="GPUs each replica holds (0.5: two replicas share a GPU)")
    serve_parser.add_argument("--max-batch-size", type=int, default=16, help="images per model call (default 16)")
    serve_parser.add_argument("--batch-wait-timeout", type=float, default=0.01, help="seconds to wait for a fuller batch (default 0.01)")
    serve_parser.add_argument("--max-ongoing-requests", type=int, default=32, help="requests a replica holds at once (default 32)")
    serve_parser.add_argument("--max-queued-requests", type=int, default=128, help="requests waiting for a replica before 503 (default 128)")
    serve_parser.add_argument("--max-images", type=int, default=64, help="images per request (default 64)")
    serve_parser.add_argument("--max-bytes", type=int, default=64 * 1024 * 1024, help="bytes per request (default 64 MiB)")
    serve_parser.add_argument("--max-pixels", type=int, default=4096 * 4096, help="pixels per image (default 4096x4096)")
    serve_parser.set_defaults(run=command_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if isinstance(getattr(args, "batch_size", 1), int) and getattr(args, "batch_size", 1) < 1:
        raise SystemExit("--batch-size must be at least 1")
    try:
        return args.run(args)
    except Exception as error:
        # A CheckpointError can only come from the scorer, so commands that never load it (report) never import it.
        scorer = sys.modules.get(f"{__package__}.scorer")
        if isinstance(error, (OutputError, UsageError)) or (scorer is not None and isinstance(error, scorer.CheckpointError)):
            print(f"error: {error}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
