"""`artquant score | describe | convert | train | eval | best-of-n`."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

RESULT_FIELDS = ("path", "score", "std", "error")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint folder or Hugging Face id (default: the preset's)")
    parser.add_argument("--base", help="base model for a LoRA release (default: the release's, else the preset's)")
    parser.add_argument("--preset", default="artquant", help="artquant (default), deqa-score, onealign-quality, onealign-aesthetics")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])


def _load_scorer(args):
    from .scorer import ArtQuantScorer

    return ArtQuantScorer.from_pretrained(args.model, base=args.base, preset=args.preset, dtype=args.dtype, device=args.device)


def _image_paths(paths: list[str]) -> list[Path]:
    from .scorer.images import iter_image_files

    return list(iter_image_files(paths))


def _done_paths(out: Path) -> set[str]:
    """Paths already scored in a JSONL file of an earlier run (a torn last line, from a kill, is ignored)."""
    done = set()
    if out.suffix == ".jsonl" and out.exists():
        for line in out.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("error") is None:
                done.add(row["path"])
    return done


class ResultWriter:
    """Rows to CSV (rewritten whole) or JSONL (appended and flushed per batch, so a rerun can resume)."""

    def __init__(self, out: Path | None, level_names: tuple[str, ...]):
        self.out, self.fields = out, [*RESULT_FIELDS[:3], *(f"p_{n}" for n in level_names), "error"]
        self.rows: list[dict] = []
        self.stream = None
        if out is not None and out.suffix == ".jsonl":
            out.parent.mkdir(parents=True, exist_ok=True)
            torn = out.exists() and out.stat().st_size and not out.read_bytes().endswith(b"\n")
            self.stream = out.open("a")
            if torn:  # a killed run's half-written line stays on its own line
                self.stream.write("\n")
        elif out is not None and out.suffix != ".csv":
            raise SystemExit(f"--out must end in .csv or .jsonl, not {out.name}")

    def add(self, path: Path, result) -> None:
        row = {"path": str(path), "score": result.score, "std": result.std}
        row.update({f"p_{k}": v for k, v in result.level_probs.items()})
        row["error"] = result.error
        if not result.ok:
            row.update({k: None for k in row if k not in ("path", "error")})
        self.rows.append(row)
        if self.stream is not None:
            self.stream.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        if self.stream is not None:
            self.stream.flush()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        elif self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            with self.out.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.fields)
                writer.writeheader()
                writer.writerows(self.rows)


def _summary(rows: list[dict], skipped: int) -> str:
    scored = [r for r in rows if r["error"] is None]
    failed = [r for r in rows if r["error"] is not None]
    lines = [f"scored {len(scored)} image(s), {len(failed)} failed" + (f", {skipped} already done" if skipped else "")]
    if scored:
        best = max(scored, key=lambda r: r["score"])
        worst = min(scored, key=lambda r: r["score"])
        mean = sum(r["score"] for r in scored) / len(scored)
        lines += [f"mean {mean:.3f}", f"best {best['score']:.3f}  {best['path']}", f"worst {worst['score']:.3f}  {worst['path']}"]
    lines += [f"failed: {r['path']}: {r['error']}" for r in failed]
    return "\n".join(lines)


def command_score(args) -> int:
    from tqdm import tqdm

    paths = _image_paths(args.paths)
    out = Path(args.out) if args.out else None
    done = _done_paths(out) if out else set()
    todo = [p for p in paths if str(p) not in done]
    if not paths:
        print("no images found under " + " ".join(args.paths), file=sys.stderr)
        return 1
    if not todo:
        print(f"all {len(paths)} image(s) already scored in {out}", file=sys.stderr)
        return 0
    scorer = _load_scorer(args)
    writer = ResultWriter(out, scorer.preset.level_names)
    try:
        with tqdm(total=len(todo), unit="img", desc="scoring", disable=args.quiet) as bar:
            for start in range(0, len(todo), args.batch_size):
                chunk = todo[start : start + args.batch_size]
                for path, result in zip(chunk, scorer.score(chunk, batch_size=args.batch_size)):
                    writer.add(path, result)
                writer.flush()
                bar.update(len(chunk))
    finally:
        writer.close()
    if out is None:
        for row in writer.rows:
            shown = "error: " + row["error"] if row["error"] else f"{row['score']:.4f} ± {row['std']:.4f}"
            print(f"{row['path']}\t{shown}")
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


def command_describe(args) -> int:
    paths = _image_paths(args.paths)
    scorer = _load_scorer(args)
    failed = 0
    for path in paths:
        text = scorer.describe([path], question=args.question, max_new_tokens=args.max_new_tokens)[0]
        failed += text.startswith("[error:")
        print(json.dumps({"path": str(path), "description": text}, ensure_ascii=False))
    return 1 if failed or not paths else 0


def command_convert(args) -> int:
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
    )


def command_best_of_n(args) -> int:
    import torch

    from .reward import best_of_n_to_folder

    pipeline_options = {
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "negative_prompt": args.negative_prompt,
        "height": args.height,
        "width": args.width,
    }
    summary = best_of_n_to_folder(
        args.pipeline,
        args.prompt,
        args.n,
        args.out,
        _load_scorer(args),
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        torch_dtype={"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(args.pipeline_dtype),
        **{k: v for k, v in pipeline_options.items() if v is not None},
    )
    best = summary["candidates"][0]
    print(f"best of {len(summary['candidates'])}: seed {best['seed']}, score {best['score']:.3f} -> {args.out}", file=sys.stderr)
    return 0 if all(c["error"] is None for c in summary["candidates"]) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="artquant", description="ArtQuant aesthetic scoring")
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser("score", help="score images (files or folders, recursed)")
    score.add_argument("paths", nargs="+")
    _add_model_arguments(score)
    score.add_argument("--batch-size", type=int, default=8)
    score.add_argument("--out", help="results.csv or results.jsonl (JSONL resumes: a rerun skips scored images)")
    score.add_argument("--quiet", action="store_true", help="no progress bar")
    score.add_argument("--report", metavar="DIR", help="also write an HTML report of the scores into DIR (see artquant report)")
    score.set_defaults(run=command_score)

    report = commands.add_parser("report", help="a static HTML page of scores: thumbnails by score, histogram, filters")
    report.add_argument("scores", help="scores .csv, .jsonl or .parquet, or the folder of artquant eval or best-of-n")
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
    evaluate.add_argument("--data", required=True, help="score JSON (reference format), CSV or JSONL of image, score")
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
    best_of_n.add_argument("--pipeline-dtype", choices=["fp32", "fp16", "bf16"])
    best_of_n.set_defaults(run=command_best_of_n)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        raise SystemExit("--batch-size must be at least 1")
    from .scorer import CheckpointError

    try:
        return args.run(args)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
