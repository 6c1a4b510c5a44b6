"""Training data: the three input formats, mixing, bad rows and unreadable images, config files and overrides."""

from __future__ import annotations

import json

import pytest
import torch

from artquant.training.config import ConfigError, load_config
from artquant.training.data import (
    ANSWER_PREFIX,
    SCORE_QUESTIONS,
    ConversationDataset,
    DataError,
    DatasetSpec,
    SplitByTask,
    mix_datasets,
    read_dataset,
    tokenize_conversation,
)


@pytest.fixture()
def image_folder(tmp_path, reference_images):
    folder = tmp_path / "images"
    folder.mkdir()
    for path in reference_images[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def test_csv_rows_become_reference_score_samples(tmp_path, image_folder, golden):
    names = [p.name for p in sorted(image_folder.glob("*.png")) if p.name != "broken.png"]
    table = tmp_path / "scores.csv"
    table.write_text("image,score\n" + f"{names[0]},7.8\n{names[1]},4.1\nmissing.png,5\n")
    samples = read_dataset(DatasetSpec(str(table), str(image_folder)))
    assert [s.gt_score for s in samples] == [7.8, 4.1]  # a missing image is skipped, not fatal
    assert samples[0].conversations[1]["value"] == f"{ANSWER_PREFIX} excellent."
    assert samples[1].conversations[1]["value"] == f"{ANSWER_PREFIX} fair."
    assert samples[0].conversations[0]["value"].removesuffix("\n<|image|>") in SCORE_QUESTIONS
    # The same level probabilities as the reference's Gaussian fit of these scores (golden training samples).
    for sample, reference in zip(samples, golden["training_samples"][:2]):
        assert sample.level_probs == pytest.approx(reference["level_probs"], abs=1e-3)


def test_jsonl_and_reference_json_and_descriptions(tmp_path, image_folder, golden):
    name = sorted(p.name for p in image_folder.glob("*.png") if p.name != "broken.png")[0]
    jsonl = tmp_path / "scores.jsonl"
    jsonl.write_text(json.dumps({"image": name, "mos": 2.0}) + "\n\n")
    records = [dict(s, image=name) for s in golden["training_samples"]]
    reference_json = tmp_path / "train.json"
    reference_json.write_text(json.dumps(records))
    assert read_dataset(DatasetSpec(str(jsonl), str(image_folder)))[0].gt_score == 2.0
    samples = read_dataset(DatasetSpec(str(reference_json), str(image_folder)))
    assert [s.task_type for s in samples] == [r.get("task_type", "score") for r in records]
    assert all((s.level_probs is None) == (s.task_type == "description") for s in samples)
    mixed = mix_datasets([DatasetSpec(str(reference_json), str(image_folder), weight=2.0),
                          DatasetSpec(str(jsonl), str(image_folder), weight=1.0)])
    assert len(mixed) == 2 * len(records) + 1


def test_bad_files_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "a.png"}]))
    with pytest.raises(DataError, match="record 0: a score sample needs a score"):
        read_dataset(DatasetSpec(str(bad)))
    with pytest.raises(DataError, match="does not exist"):
        read_dataset(DatasetSpec(str(tmp_path / "nope.csv")))
    with pytest.raises(DataError, match="human/gpt"):
        tokenize_conversation(None, [{"from": "human", "value": "hi"}])


def test_unreadable_images_are_skipped_in_batches(tmp_path, image_folder, base_scorer, golden):
    records = [dict(golden["training_samples"][0], image=name) for name in ("broken.png", sorted(
        p.name for p in image_folder.glob("*.png") if p.name != "broken.png")[0])]
    records.append(dict(golden["training_samples"][2], image=records[1]["image"]))
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    dataset = ConversationDataset(read_dataset(DatasetSpec(str(data), str(image_folder))), base_scorer.tokenizer,
                                  base_scorer.image_config)
    batch = SplitByTask(base_scorer.tokenizer.unk_token_id)([dataset[i] for i in range(len(dataset))])
    assert len(batch["skipped"]) == 1 and "broken.png" in batch["skipped"][0]
    assert batch["score"]["input_ids"].shape[0] == 1 and batch["description"]["input_ids"].shape[0] == 1
    size = base_scorer.image_config.crop_size
    assert batch["score"]["pixel_values"].shape == (1, 3, size, size)
    assert torch.equal(batch["score"]["attention_mask"], batch["score"]["input_ids"].ne(0))


def test_config_file_and_overrides(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("base_model: base\ndata:\n  - path: scores.csv\n    weight: 0.5\nlora_r: 16\n")
    config = load_config(config_file, ["learning_rate=1e-4", "--gradient_checkpointing=false", "epochs=2"])
    assert config.lora_r == 16 and config.learning_rate == 1e-4 and config.gradient_checkpointing is False
    assert config.epochs == 2.0 and config.data[0].weight == 0.5
    assert config.data[0].path == str(tmp_path / "scores.csv")
    assert (config.lora_alpha, config.lora_dropout, config.weight_next_token) == (256, 0.05, 0.05)
    with pytest.raises(ConfigError, match="unknown config keys"):
        load_config(config_file, ["learnig_rate=1"])
    with pytest.raises(ConfigError, match="number"):
        load_config(config_file, ["lora_r=big"])
    with pytest.raises(ConfigError, match="precision"):
        load_config(config_file, ["precision=int8"])


def test_evaluation_metrics_against_their_definitions():
    import numpy as np
    from scipy.stats import kendalltau, pearsonr, spearmanr

    from artquant.training.evaluate import fit_logistic, score_metrics

    rng = np.random.default_rng(0)
    predicted = rng.uniform(-6, 6, 200)
    # Human scores a logistic function of the prediction: the fit must straighten it, rank metrics must not care.
    truth = 1 + 9 / (1 + np.exp(-predicted)) + rng.normal(0, 0.05, 200)
    metrics = score_metrics(predicted, truth)
    assert metrics["n"] == 200
    assert metrics["srcc"] == pytest.approx(spearmanr(predicted, truth)[0])
    assert metrics["krcc"] == pytest.approx(kendalltau(predicted, truth)[0])
    assert metrics["plcc"] == pytest.approx(pearsonr(predicted, truth)[0])
    assert metrics["plcc_logistic"] > metrics["plcc"] + 0.02 and metrics["plcc_logistic"] > 0.99
    assert metrics["mae"] == pytest.approx(np.abs(predicted - truth).mean())
    assert metrics["mse"] == pytest.approx(((predicted - truth) ** 2).mean())
    # Same level for every image (hard labels of both sides agree) only when predictions equal the truth.
    assert score_metrics(truth, truth)["level_accuracy"] == 1.0
    assert fit_logistic(np.ones(5), np.arange(5.0)).shape == (5,), "a flat prediction must not crash the fit"
