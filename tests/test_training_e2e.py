"""Training end to end through `artquant train` / `artquant eval`: a tiny random mPLUG-Owl2 learns to rate hazy photos; a LoRA run
interrupted and resumed ends with the same weights as an uninterrupted one, and its release loads in the scorer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from training_synthetic import build_tiny_model, source_photos, write_task  # noqa: E402

from artquant.cli import main as cli_main  # noqa: E402
from artquant.training import run_training  # noqa: E402
from artquant.training import trainer  # noqa: E402


@pytest.fixture(scope="module")
def task(tmp_path_factory, reference_dir):
    root = tmp_path_factory.mktemp("training")
    build_tiny_model(reference_dir, root / "base")
    paths = write_task(root / "data", source_photos(reference_dir), per_photo=12, seed=0)
    return root, paths


def write_config(path: Path, **values) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def evaluate(model: Path, data: Path, images: Path, out: Path, base: Path | None = None) -> dict:
    arguments = ["eval", "--model", str(model), "--data", str(data), "--out", str(out), "--image-folder", str(images),
                 "--device", "cpu", "--dtype", "fp32"] + (["--base", str(base)] if base else [])
    assert cli_main(arguments) == 0
    return json.loads((out / "report.json").read_text())["metrics"]


def test_training_learns_to_rate_held_out_images(task):
    root, paths = task
    config = write_config(
        root / "learn.yaml",
        base_model="base", output_dir="learn", lora=False, precision="fp32", gradient_checkpointing=False,
        data=[{"path": "data/scores.csv", "image_folder": "data/images"},
              {"path": "data/descriptions.json", "image_folder": "data/images", "weight": 0.25}],
        learning_rate=1e-3, epochs=6, batch_size=8, weight_next_token=1.0, num_workers=0, save_steps=0,
        logging_steps=10, seed=0, tensorboard=False,
    )
    assert cli_main(["train", str(config), "logging_steps=5"]) == 0
    log = [json.loads(line) for line in (root / "learn" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    assert log[-1]["score_softkl"] < log[0]["score_softkl"]
    before = evaluate(root / "base", paths["held_out"], paths["images"], root / "eval_before")
    after = evaluate(root / "learn" / "release", paths["held_out"], paths["images"], root / "eval_after")
    assert after["srcc"] >= 0.8
    assert after["srcc"] > before["srcc"] + 0.3
    assert (root / "eval_after" / "scatter.png").stat().st_size > 0
    assert (root / "eval_after" / "histogram.png").stat().st_size > 0


def lora_config(root: Path, name: str, **extra) -> Path:
    return write_config(
        root / f"{name}.yaml", **extra,
        base_model="base", output_dir=name, lora_r=4, lora_alpha=8, precision="fp32", gradient_checkpointing=True,
        data=[{"path": "data/scores.csv", "image_folder": "data/images", "weight": 0.1},
              {"path": "data/descriptions.json", "image_folder": "data/images", "weight": 0.05}],
        learning_rate=1e-3, max_steps=6, save_steps=3, batch_size=2, gradient_accumulation_steps=2, num_workers=0,
        logging_steps=1, seed=0, tensorboard=False,
    )


def release_tensors(release: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(release / "adapter_model.safetensors")),
            **load_file(str(release / "non_lora_trainables.safetensors"))}


def test_interrupted_lora_run_resumes_to_the_same_weights(task, monkeypatch):
    root, _ = task
    # The uninterrupted run also evaluates on the held-out file every 3 steps (eval does not touch the RNG).
    held_out = {"path": "data/held_out.json", "image_folder": "data/images"}
    straight = lora_config(root, "straight", eval_data=held_out, eval_steps=3, reference_layout=True)
    assert run_training(str(straight), []) == 0
    held_out_records = len(json.loads((root / "data" / "held_out.json").read_text()))
    for step in (3, 6):
        report = json.loads((root / "straight" / "eval" / f"step-{step}" / "report.json").read_text())
        assert report["metrics"]["n"] == held_out_records and not report["failed"]

    original_step, calls = trainer._optimizer_step, []

    def killed_at_step_five(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated kill")
        return original_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "_optimizer_step", killed_at_step_five)
    with pytest.raises(KeyboardInterrupt):
        run_training(str(lora_config(root, "resumed")), [])
    monkeypatch.setattr(trainer, "_optimizer_step", original_step)
    assert trainer.latest_checkpoint(root / "resumed").name == "checkpoint-3"
    assert run_training(str(lora_config(root, "resumed")), []) == 0

    straight, resumed = release_tensors(root / "straight" / "release"), release_tensors(root / "resumed" / "release")
    assert straight.keys() == resumed.keys()
    assert any("lora_B" in k for k in straight) and any("visual_abstractor" in k for k in straight)
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-6, msg=name)
    log = [json.loads(line)["step"] for line in (root / "resumed" / "train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 4, 5, 6], "killed after logging step 4, resumed from checkpoint-3"


def test_lora_release_loads_in_the_scorer(task):
    from artquant import ArtQuantScorer

    root, paths = task
    release = root / "straight" / "release"
    for name in ("adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.safetensors", "config.json",
                 "tokenizer.model", "preprocessor_config.json", "non_lora_trainables.bin"):
        assert (release / name).is_file(), name
    scorer = ArtQuantScorer.from_pretrained(str(release), base=str(root / "base"), device="cpu", dtype="fp32")
    trained = load_file(str(release / "non_lora_trainables.safetensors"))
    loaded = scorer.model.state_dict()
    for name, tensor in trained.items():
        torch.testing.assert_close(loaded[name], tensor, msg=name)
    reference_layout = torch.load(release / "non_lora_trainables.bin", weights_only=True)
    assert all(k.startswith("base_model.model.model.") for k in reference_layout)
    image = sorted(paths["images"].glob("*.png"))[0]
    base = ArtQuantScorer.from_pretrained(str(root / "base"), device="cpu", dtype="fp32")
    assert scorer.score([image])[0].score != pytest.approx(base.score([image])[0].score, abs=1e-6)
    # By default a release is safetensors only, and loads as such.
    safetensors_only = root / "resumed" / "release"
    assert not (safetensors_only / "non_lora_trainables.bin").exists()
    resumed = ArtQuantScorer.from_pretrained(str(safetensors_only), base=str(root / "base"), device="cpu", dtype="fp32")
    assert resumed.score([image])[0].score == pytest.approx(scorer.score([image])[0].score, abs=1e-4)
