"""Bad inputs to `artquant train` and `artquant eval`, as tables (input -> exact message fragment / exit code), and the
guarantees behind them: nothing read from a run, a release or a data file runs code; a NaN loss never becomes a
release; undefined metrics are null with a reason."""

from __future__ import annotations

import json
import logging
import math
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from training_synthetic import build_tiny_model  # noqa: E402

from artquant.cli import main as cli_main  # noqa: E402
from artquant.training.config import ConfigError, load_config  # noqa: E402
from artquant.training.data import DataError, DatasetSpec, read_dataset  # noqa: E402
from artquant.training.loss import ArtQuantLoss  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SCORE_ANSWER = [{"from": "human", "value": "Rate the quality of this painting.\n<|image|>"},
                {"from": "gpt", "value": "The quality of the painting is good."}]


class Payload:
    """Unpickling this object creates `marker`: the stand-in for code that a hostile file runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, reference_dir, reference_images):
    """A tiny base model, four images and a score CSV; relative paths in configs resolve against `root`."""
    root = tmp_path_factory.mktemp("bad_inputs")
    build_tiny_model(reference_dir, root / "base")
    images = root / "images"
    images.mkdir()
    names = []
    for path in reference_images[:4]:
        shutil.copyfile(path, images / path.name)
        names.append(path.name)
    (root / "scores.csv").write_text("image,score\n" + "".join(f"{n},{2 + 2 * i}\n" for i, n in enumerate(names)))
    return root, names


def write_config(root: Path, name: str, **values) -> Path:
    defaults = dict(base_model="base", output_dir=name, data=[{"path": "scores.csv", "image_folder": "images"}],
                    lora_r=2, lora_alpha=4, precision="fp32", gradient_checkpointing=False, batch_size=2,
                    num_workers=0, max_steps=2, save_steps=1, logging_steps=1, learning_rate=1e-3, tensorboard=False)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**defaults, **values}))
    return path


def run_cli(arguments: list[str], caplog) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = cli_main(arguments)
    return code, caplog.text


# ----------------------------------------------------------------------------------------------------------------
# Config: every row is a ConfigError, and `artquant train` exits 2 with the message (before any model is loaded)
# ----------------------------------------------------------------------------------------------------------------
CONFIG_ROWS = [
    ("batch_size: 0", [], "batch_size must be at least 1, got 0."),
    ("max_steps: -1", [], "max_steps must be at least 0, got -1."),
    ("batch_size: 2.5", [], "batch_size must be a whole number, got 2.5."),
    ("batch_size: true", [], "batch_size must be a whole number, got True."),
    ("learning_rate: .nan", [], "learning_rate must be at least 0, got nan."),
    ("lora_dropout: 1.5", [], "lora_dropout must be between 0 and 1, got 1.5."),
    ("gradient_accumulation_steps: 0", [], "gradient_accumulation_steps must be at least 1, got 0."),
    ("epochs: 0", [], "epochs must be > 0, or set max_steps"),
    ("lr_scheduler: cosnie", [], "lr_scheduler must be one of linear, cosine"),
    ("output_dir: [a, b]", [], "output_dir must be text, got ['a', 'b']."),
    ("score_range: [100, 0]", [], "score_range must be [lowest, highest] of the dataset's scores"),
    ("score_range: [0]", [], "score_range must be [lowest, highest]"),
    ("data: [{path: s.csv, weight: 0}]", [], "data[0]: weight must be a number > 0, got 0."),
    ("data: [{path: s.csv, format: xlsx}]", [], "data[0]: format must be one of auto, json, csv, jsonl, got 'xlsx'."),
    ("data: [{path: s.csv, score_range: [0, 0]}]", [], "data[0].score_range must be [lowest, highest]"),
    ("data: [{path: s.csv, colour: red}]", [], "data[0]: unknown dataset keys ['colour']."),
    ("data: [s.csv\nlora_r: [", [], "is not valid YAML"),
    ("lora_r: !!python/object/apply:os.system ['echo hacked']", [], "is not valid YAML"),
    ("- a\n- b", [], "the config must be a YAML mapping"),
    ("1: 2", [], "unknown config keys ['1']"),
    ("", ["batch_size=0"], "batch_size must be at least 1, got 0."),
    ("", ["lora_r=["], "override 'lora_r=[' is not valid YAML"),
    ("", ["lora_r"], "override 'lora_r' must look like key=value."),
    ("", ["max_steps=1e400"], "max_steps must be a whole number"),
]


@pytest.mark.parametrize(("yaml_text", "overrides", "message"), CONFIG_ROWS)
def test_bad_config_is_a_config_error_and_exit_2(tmp_path, caplog, yaml_text, overrides, message):
    config = tmp_path / "run.yaml"
    config.write_text(yaml_text if yaml_text.startswith(("-", "data:")) else f"data: [s.csv]\n{yaml_text}")
    with pytest.raises(ConfigError) as error:
        load_config(config, overrides)
    assert message in str(error.value)
    code, log = run_cli(["train", str(config), *overrides], caplog)
    assert code == 2 and message in log


def test_unsafe_yaml_tag_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    config = tmp_path / "run.yaml"
    touch = f"!!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]"
    config.write_text(f"data: [s.csv]\nlora_r: {touch}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(config)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------------
# Data files: refused when read, naming the file and the record; `artquant train` exits 2 before loading the model
# ----------------------------------------------------------------------------------------------------------------
def _json(records) -> bytes:
    return json.dumps(records).encode()


DATA_ROWS = [
    ("s.csv", b"image,score\na.png,57\n", "s.csv row 2: score 57 is outside ArtQuant's scale 1..10; if the dataset "
     "uses another scale, name it in the config (e.g. score_range: [0, 100])"),
    ("s.csv", b"image,score\na.png,nan\n", "s.csv row 2: the score must be a finite number, got 'nan'"),
    ("s.csv", b"image,score\na.png,good\n", "s.csv row 2: the score must be a number, got 'good'"),
    ("s.csv", b"image,score\na.png,\n", "s.csv row 2: a score sample needs a score (score/gt_score/mos/Score/MOS)"),
    ("s.csv", b"picture,score\na.png,5\n", "s.csv row 2: needs an image (image/filename/file/path/image_path)"),
    ("s.csv", b"image,score\na.png,5\nb.png,x\nc.png,99\n", "s.csv: 2 of 3 records cannot be used"),
    ("s.csv", "image,score\ncaf\u00e9.png,5\n".encode("latin-1"), "s.csv is not UTF-8 text: byte 0xe9 at position 15. "
     "Save it as UTF-8 (in Excel: 'CSV UTF-8')."),
    ("s.csv", "image,score\na.png,5\n".encode("utf-16"), "s.csv is not UTF-8 text (it looks like UTF-16"),
    ("s.csv", b"image,score\na.png,5\0\n", "s.csv row 2: the score must be a number, got '5\\x00'"),
    ("s.csv", b"image,score\n" + b"a" * 140_000 + b".png,5\n", "s.csv near line 2: not a CSV row (field larger than"),
    ("s.jsonl", b'{"image": "a.png", "mos": 3}\n{"image": \n', "s.jsonl line 2: not a JSON line"),
    ("s.jsonl", b'[1, 2]\n', "s.jsonl line 1: expected an object with an image and a score or conversations"),
    ("s.json", b'{"image": "a.png"}', "s.json: expected a JSON list of records, got a dict."),
    ("s.json", b'[{"image": "a.png", ', "s.json: not valid JSON"),
    ("s.json", _json([{"image": "a.png", "gt_score": True}]), "s.json record 0: the score must be a number, got True"),
    ("s.json", _json([{"image": ["a.png", "b.png"], "gt_score": 5}]), "record 0: several images per sample"),
    ("s.json", _json([{"image": "a.png", "gt_score": 5}, {"image": "a.png", "level_probs": [0.5, 0.5, 0, 0],
                      "conversations": SCORE_ANSWER}]),
     "s.json record 1: level_probs must be a list of 5 probabilities"),
    ("s.json", b'[{"image": "a.png", "level_probs": [NaN, 0, 0, 0, 1], "conversations": []}]',
     "s.json record 0: each of level_probs must be a finite number, got nan"),
    ("s.json", _json([{"image": "a.png", "level_probs": [1, 1, 0, 0, 0], "conversations": SCORE_ANSWER}]),
     "s.json record 0: level_probs must be >= 0 and sum to 1"),
    ("s.json", _json([{"image": "a.png", "level_probs": ["x", 1, 0, 0, 0], "conversations": SCORE_ANSWER}]),
     "s.json record 0: each of level_probs must be a number, got 'x'"),
    ("s.json", _json([{"image": "a.png", "gt_score": 5, "conversations": "hello"}]),
     "s.json record 0: conversations must be a list of"),
    ("s.json", _json([{"image": "a.png", "gt_score": 5, "conversations": [SCORE_ANSWER[0], SCORE_ANSWER[0]]}]),
     "s.json record 0: conversations must alternate human, gpt turns, got ['human', 'human']"),
    ("s.json", _json([{"image": "a.png", "gt_score": 5, "conversations": [
        {"from": "human", "value": "Rate it."}, SCORE_ANSWER[1]]}]),
     "record 0: conversations must hold exactly one <|image|>"),
    ("s.json", _json([{"image": "a.png", "gt_score": 5, "conversations": [
        SCORE_ANSWER[0], {"from": "gpt", "value": "Lovely."}]}]),
     "record 0: a score answer must read 'The quality of the painting is <level>.'"),
    ("s.json", _json([{"image": "a.png", "task_type": "caption", "conversations": SCORE_ANSWER}]),
     "record 0: task_type must be 'score' or 'description', got 'caption'"),
    ("s.json", _json([{"image": "a.png", "task_type": "description"}]),
     "record 0: a description sample needs 'conversations'"),
    ("s.json", _json(["a.png"]), "s.json record 0: expected an object"),
]


@pytest.mark.parametrize(("name", "content", "message"), DATA_ROWS)
def test_bad_data_is_refused_when_read(tmp_path, caplog, name, content, message):
    data = tmp_path / name
    data.write_bytes(content)
    with pytest.raises(DataError) as error:
        read_dataset(DatasetSpec(str(data)))
    assert message in str(error.value)
    # Through the CLI: exit 2 with the message, and the base model (which does not exist here) is never loaded.
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"base_model": "no-such-model", "data": [name]}))
    code, log = run_cli(["train", str(config)], caplog)
    assert code == 2 and message in log


@pytest.mark.parametrize(("content", "score_range", "expected"), [
    (b"\xef\xbb\xbfimage,score\na.png,3\nb.png,9.5\n", None, [3.0, 9.5]),  # Excel's CSV UTF-8: a byte-order mark
    (b"image,mos\na.png,0\nb.png,50\nc.png,100\n", [0, 100], [1.0, 5.5, 10.0]),  # rescaled to 1..10
    (b"image,mos\na.png,1\nb.png,5\n", [1, 5], [1.0, 10.0]),
])
def test_readable_tables_and_rescaled_scores(tmp_path, content, score_range, expected):
    data = tmp_path / "s.csv"
    data.write_bytes(content)
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"")
    samples = read_dataset(DatasetSpec(str(data), score_range=score_range))
    assert [s.gt_score for s in samples] == pytest.approx(expected)
    assert all(math.isfinite(p) for s in samples for p in s.level_probs)
    assert [s.image for s in samples] == [str(tmp_path / n) for n in ("a.png", "b.png", "c.png")[:len(expected)]]


def test_score_range_in_the_config_applies_to_every_dataset_without_its_own(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("score_range: [0, 100]\ndata: [a.csv, {path: b.csv, score_range: [1, 5]}]\n")
    loaded = load_config(config)
    assert [d.score_range for d in loaded.data] == [(0.0, 100.0), (1.0, 5.0)]
    (tmp_path / "a.csv").write_text("image,score\nx.png,101\n")
    with pytest.raises(DataError, match=r"a.csv row 2: score 101 is outside the dataset's score_range 0..100"):
        read_dataset(loaded.data[0])


# ----------------------------------------------------------------------------------------------------------------
# A non-finite loss stops the run (exit 1) and keeps the last good checkpoint; no NaN release
# ----------------------------------------------------------------------------------------------------------------
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(workspace, monkeypatch, caplog):
    root, _ = workspace
    config = write_config(root, "nan_run", max_steps=4)
    original, calls = ArtQuantLoss.forward, []

    def nan_from_the_third_step(self, **batches):
        terms = original(self, **batches)
        calls.append(1)
        if len(calls) >= 3:
            terms["loss"] = terms["loss"] * math.nan
        return terms

    monkeypatch.setattr(ArtQuantLoss, "forward", nan_from_the_third_step)
    code, log = run_cli(["train", str(config)], caplog)
    output = root / "nan_run"
    assert code == 1
    assert "stopped at step 3: the loss is nan" in log
    assert f"the last good checkpoint is {output / 'checkpoint-2'}" in log
    assert not (output / "release").exists()
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    weights = load_file(str(output / "checkpoint-2" / "trainable.safetensors"))
    assert weights and all(bool(torch.isfinite(t).all()) for t in weights.values())
    # With the fault gone, the same command resumes from that checkpoint and finishes.
    monkeypatch.setattr(ArtQuantLoss, "forward", original)
    assert run_cli(["train", str(config)], caplog)[0] == 0
    steps = [json.loads(line)["step"] for line in (output / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4], "steps 1-2, the stop at 3 (not logged), then 3-4 resumed from checkpoint-2"
    assert (output / "release" / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------------------------
# Nothing read runs code: a pickle payload planted as every file of a checkpoint, a release and eval's inputs
# ----------------------------------------------------------------------------------------------------------------
# Names accelerate's load_state, peft, torch and the reference's code read with full unpickling.
PICKLE_NAMES = ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin", "sampler.bin",
                "dl_state_dict.bin", "scaler.pt", "pytorch_model.bin", "adapter_model.bin", "non_lora_trainables.bin",
                "training_args.bin", "model.pt", "model.pth", "model.ckpt", "optimizer.pt")


def plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Payload(marker)))


@pytest.fixture(scope="module")
def finished_run(workspace):
    root, _ = workspace
    config = write_config(root, "planted", max_steps=2)
    assert cli_main(["train", str(config)]) == 0
    return root, config


def test_the_payload_is_live(tmp_path):
    marker = tmp_path / "marker"
    plant(tmp_path / "x.pt", marker)
    pickle.loads((tmp_path / "x.pt").read_bytes())
    assert marker.exists(), "the payload must run when unpickled, or the tests below prove nothing"
    marker.unlink()
    with pytest.raises(RuntimeError, match="magic number"):  # torch's legacy format: the payload runs first
        torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()


def test_resume_never_unpickles(finished_run, tmp_path, caplog):
    root, _ = finished_run
    checkpoint = root / "planted" / "checkpoint-2"
    read_by_resume = sorted(p.name for p in checkpoint.iterdir())
    assert "optimizer.pt" in read_by_resume and "trainer_state.json" in read_by_resume
    marker = tmp_path / "marker"
    # Each file of the checkpoint replaced in turn (the rest intact, so resume gets as far as that file), then
    # every file at once; accelerate's pickled names are planted beside them throughout.
    for replaced in [[name] for name in read_by_resume] + [read_by_resume]:
        run = tmp_path / f"run-{len(replaced)}-{replaced[0]}"
        shutil.copytree(checkpoint, run / "checkpoint-2")
        for name in [*replaced, *PICKLE_NAMES]:
            plant(run / "checkpoint-2" / name, marker)
        config = write_config(root, "planted_resume", output_dir=str(run), max_steps=3)
        code, log = run_cli(["train", str(config)], caplog)
        assert not marker.exists(), replaced
        assert code == 2 and "cannot resume from" in log and "set resume: false" in log, (replaced, log)
    # Only accelerate's names planted: they are never read, and the run resumes.
    run = tmp_path / "accelerate-names"
    shutil.copytree(checkpoint, run / "checkpoint-2")
    for name in PICKLE_NAMES:
        if not (run / "checkpoint-2" / name).exists():
            plant(run / "checkpoint-2" / name, marker)
    code, log = run_cli(["train", str(write_config(root, "planted_resume", output_dir=str(run), max_steps=3))], caplog)
    assert code == 0 and not marker.exists()
    assert [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()] == [3]


def test_release_convert_and_eval_never_unpickle(finished_run, tmp_path, caplog):
    from artquant import ArtQuantScorer

    root, _ = finished_run
    marker = tmp_path / "marker"
    base, release = tmp_path / "base", tmp_path / "release"
    shutil.copytree(root / "base", base)
    shutil.copytree(root / "planted" / "release", release)
    data = tmp_path / "eval.json"
    data.write_text(json.dumps([{"image": str(root / "images" / n), "gt_score": 5} for n in ("a", "b", "c")]))
    for folder in (base, release):
        for name in PICKLE_NAMES:
            if not (folder / name).exists():
                plant(folder / name, marker)

    def load() -> None:
        ArtQuantScorer.from_pretrained(str(release), base=str(base), device="cpu", dtype="fp32")

    def convert() -> None:
        cli_main(["convert", "--model", str(release), "--base", str(base), "--out", str(tmp_path / "c"),
                  "--device", "cpu", "--dtype", "fp32"])

    def evaluate() -> None:
        cli_main(["eval", "--model", str(release), "--base", str(base), "--data", str(data), "--out",
                  str(tmp_path / "e"), "--device", "cpu", "--dtype", "fp32", "--no-plots"])

    def survives(reader) -> None:
        try:
            reader()
        except Exception:  # an error is fine; running the payload is not
            pass
        assert not marker.exists(), reader.__name__

    for reader in (load, convert, evaluate):
        survives(reader)
    # Each file of the release and the base replaced in turn (convert and eval load through the same loader).
    originals = {p: p.read_bytes() for folder in (base, release) for p in folder.iterdir()
                 if p.name not in PICKLE_NAMES}
    for path, content in originals.items():
        plant(path, marker)
        survives(load)
        path.write_bytes(content)
    plant(data, marker)  # the eval data file itself
    code, _ = run_cli(["eval", "--model", str(release), "--base", str(base), "--data", str(data), "--out",
                       str(tmp_path / "e"), "--device", "cpu", "--dtype", "fp32"], caplog)
    assert code == 2 and not marker.exists()


# ----------------------------------------------------------------------------------------------------------------
# Evaluation data: a plain {"image", "gt_score"} list works; too few or constant scores still give a report
# ----------------------------------------------------------------------------------------------------------------
def strict_json(path: Path):
    def refuse(constant):
        raise AssertionError(f"bare {constant} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def eval_images(workspace):
    root, names = workspace
    return [str(root / "images" / n) for n in names]


def run_eval(reference_dir, data_records, tmp_path, caplog, *extra) -> tuple[int, dict, str]:
    data = tmp_path / "eval.json"
    data.write_text(json.dumps(data_records))
    out = tmp_path / "out"
    code, log = run_cli(["eval", "--model", str(reference_dir / "mplug_owl2_base"), "--data", str(data), "--out",
                         str(out), "--device", "cpu", "--dtype", "fp32", *extra], caplog)
    return code, strict_json(out / "report.json") if (out / "report.json").exists() else {}, log


EVAL_ROWS = [
    # (scores given to the images, extra records, exit code, n, undefined reason fragment or None, failed count)
    ([2.0, 4.0, 6.0, 8.0], [], 0, 4, None, 0),
    ([2.0, 8.0], [], 1, 2, "correlations need at least 3 scored images, got 2", 0),
    ([5.0, 5.0, 5.0, 5.0], [], 1, 4, "all human scores are equal", 0),
    ([2.0, 4.0, 6.0, 8.0], [{"image": "nowhere.png", "gt_score": 3}, {"image": "x.png", "gt_score": "high"}], 1, 4,
     None, 2),
    ([], [{"image": "x.png", "gt_score": 50}], 1, 0, "no image was scored", 1),
]


@pytest.mark.parametrize(("scores", "extra", "code", "n", "undefined", "failed"), EVAL_ROWS)
def test_eval_always_writes_a_strict_json_report(reference_dir, eval_images, tmp_path, caplog, scores, extra, code, n,
                                                 undefined, failed):
    records = [{"image": image, "gt_score": score} for image, score in zip(eval_images, scores)] + extra
    exit_code, report, _ = run_eval(reference_dir, records, tmp_path, caplog)
    assert exit_code == code
    metrics = report["metrics"]
    assert metrics["n"] == n and len(report["predictions"]) == n and len(report["failed"]) == failed
    assert report["undefined"] is None if undefined is None else undefined in report["undefined"]
    for name in ("srcc", "plcc", "plcc_logistic", "krcc"):
        assert (metrics[name] is None) == (undefined is not None), name
    if n:
        assert metrics["mae"] is not None and metrics["level_accuracy"] is not None


def test_eval_failures_name_the_record_and_the_hint(reference_dir, eval_images, tmp_path, caplog):
    records = [{"image": image, "gt_score": score} for image, score in zip(eval_images, (0, 40, 70, 100))]
    code, report, _ = run_eval(reference_dir, records + [{"image": "x.png", "gt_score": 101}], tmp_path, caplog,
                               "--score-range", "0", "100")
    assert code == 1 and report["metrics"]["n"] == 4 and report["undefined"] is None
    assert [p["gt_score"] for p in report["predictions"]] == pytest.approx([1.0, 4.6, 7.3, 10.0])
    assert report["failed"] == [{"image": "x.png", "error": f"{tmp_path / 'eval.json'} record 4: score 101 is outside "
                                 "the dataset's score_range 0..100"}]


@pytest.mark.parametrize(("arguments", "message"), [
    (["--data", "missing.json"], "data file missing.json does not exist"),
    (["--score-range", "5", "1"], "--score-range needs LOW < HIGH, got 5 1."),
    (["--out", str(Path(__file__))], "cannot write the report into"),
])
def test_eval_refuses_unusable_arguments_with_exit_2(reference_dir, eval_images, tmp_path, caplog, arguments, message):
    data = tmp_path / "eval.json"
    data.write_text(json.dumps([{"image": eval_images[0], "gt_score": 5}]))
    code, log = run_cli(["eval", "--model", str(reference_dir / "mplug_owl2_base"), "--data", str(data), "--out",
                         str(tmp_path / "out"), *arguments], caplog)
    assert code == 2 and message in log
