"""Training data: the reference's score and RAD description JSON, and (image, score) tables, tokenised as ArtQuant.

Every sample becomes the `v1` (vicuna) conversation the reference trained on: its system prompt, the image moved to
the start of the first question, the answer tokens (and `</s>`) as labels. Score samples also carry the target level
probabilities of score-based distribution estimation.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..scorer.images import ImageInputError, read_image
from ..scorer.levels import ARTQUANT_LEVELS, hard_label, score_to_level_probs
from ..scorer.modeling_mplug_owl2 import IGNORE_INDEX
from ..scorer.preprocessing import ImageProcessingConfig, pixel_values_from_images
from ..scorer.tokenizer import IMAGE_PLACEHOLDER, PromptTokenizer

logger = logging.getLogger(__name__)

V1_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ANSWER_PREFIX = "The quality of the painting is"
# The reference's ten score questions (preprocess/preprocess.ipynb); one is drawn per (image, score) row.
SCORE_QUESTIONS = (
    "Rate the quality of this painting.",
    "How would you rate the quality of this painting?",
    "How would you judge the quality of this painting?",
    "How do you assess the quality of this painting?",
    "Could you evaluate the quality of this painting?",
    "What is your quality rating for this painting?",
    "Can you rate the quality of this painting?",
    "What do you think about the quality of this painting?",
    "Can you judge the quality of this painting?",
    "What's your opinion on the quality of this painting?",
)
IMAGE_COLUMNS = ("image", "filename", "file", "path", "image_path")
SCORE_COLUMNS = ("score", "gt_score", "mos", "Score", "MOS")


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and row and says what to fix."""


@dataclass
class Sample:
    """One training conversation about one image. `level_probs` [L] for score samples, None for descriptions."""

    image: str
    conversations: list[dict]
    task_type: str = "score"
    level_probs: list[float] | None = None
    gt_score: float | None = None


@dataclass
class DatasetSpec:
    """One data file and how much of it goes into the mix (`weight` 2.5 = every sample twice plus half again)."""

    path: str
    image_folder: str = ""
    weight: float = 1.0
    format: str = "auto"  # auto | json | csv | jsonl


# ----------------------------------------------------------------------------------------------------------------
# Tokenisation (the reference's `v1` template and label masking)
# ----------------------------------------------------------------------------------------------------------------
def _image_first(text: str) -> str:
    """The reference's `preprocess_multimodal`: the image placeholder goes to the front of its turn."""
    if IMAGE_PLACEHOLDER not in text:
        return text
    return (IMAGE_PLACEHOLDER + "\n" + text.replace(IMAGE_PLACEHOLDER, "").strip()).strip()


def tokenize_conversation(tokenizer: PromptTokenizer, conversations: Sequence[dict]) -> tuple[list[int], list[int]]:
    """`[{"from": "human"|"gpt", "value": ...}, ...]` -> (input_ids, labels) as the reference's `preprocess_v1`.

    Labels are the answers and their `</s>`; everything the user side says is `IGNORE_INDEX`.
    """
    turns = list(conversations)
    if turns and turns[0].get("from") != "human":
        turns = turns[1:]  # the reference drops a leading assistant turn
    if len(turns) < 2 or len(turns) % 2:
        raise DataError(f"a conversation needs human/gpt turn pairs, got {[t.get('from') for t in turns]}")
    input_ids: list[int] = []
    labels: list[int] = []
    for index in range(0, len(turns), 2):
        human, answer = turns[index], turns[index + 1]
        if human.get("from") != "human" or answer.get("from") != "gpt":
            raise DataError(f"turns must alternate human, gpt; got {human.get('from')}, {answer.get('from')}")
        question = _image_first(str(human["value"]))
        if index == 0:
            prompt_ids = tokenizer.encode_with_images(f"{V1_SYSTEM_PROMPT} USER: {question} ASSISTANT:")
        else:
            prompt_ids = tokenizer.encode(f"USER: {question} ASSISTANT:")
        answer_ids = tokenizer.encode(str(answer["value"])) + [tokenizer.eos_token_id]
        input_ids += prompt_ids + answer_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    return input_ids, labels


def score_conversation(score: float, question: str) -> list[dict]:
    """The reference's score sample: a question with the image, the hard-label answer."""
    return [
        {"from": "human", "value": f"{question}\n{IMAGE_PLACEHOLDER}"},
        {"from": "gpt", "value": f"{ANSWER_PREFIX} {hard_label(score)}."},
    ]


# ----------------------------------------------------------------------------------------------------------------
# Reading data files
# ----------------------------------------------------------------------------------------------------------------
def _resolve_image(image: str, image_folder: str, data_file: Path) -> str:
    if os.path.isabs(image):
        return image
    return str(Path(image_folder or data_file.parent) / image)


def _sample_from_record(record: dict, where: str, image_folder: str, data_file: Path) -> Sample:
    for key in ("image", "conversations"):
        if key not in record:
            raise DataError(f"{where}: missing '{key}'. Each record needs 'image' and 'conversations'.")
    if isinstance(record["image"], list):
        raise DataError(f"{where}: several images per sample are not supported; use one image per record.")
    task_type = record.get("task_type", "score")
    if task_type not in ("score", "description"):
        raise DataError(f"{where}: task_type must be 'score' or 'description', got {task_type!r}.")
    level_probs = record.get("level_probs") if task_type == "score" else None
    gt_score = record.get("gt_score")
    if task_type == "score" and level_probs is None:
        if gt_score is None:
            raise DataError(f"{where}: a score sample needs 'level_probs' or 'gt_score'.")
        level_probs = score_to_level_probs([float(gt_score)])[0].tolist()
    if level_probs is not None and len(level_probs) != len(ARTQUANT_LEVELS):
        raise DataError(f"{where}: level_probs needs {len(ARTQUANT_LEVELS)} values (excellent..bad).")
    return Sample(
        image=_resolve_image(str(record["image"]), image_folder, data_file),
        conversations=record["conversations"],
        task_type=task_type,
        level_probs=None if level_probs is None else [float(p) for p in level_probs],
        gt_score=None if gt_score is None else float(gt_score),
    )


def _table_rows(path: Path, fmt: str) -> list[dict]:
    if fmt == "csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not a JSON line ({error}).") from None
    return rows


def _pick(row: dict, names: Sequence[str]):
    return next((row[n] for n in names if n in row and row[n] not in (None, "")), None)


def read_score_table(path: str | Path, image_folder: str = "", fmt: str = "csv", seed: int = 0) -> tuple[list[Sample], list[str]]:
    """(image, score) rows of a CSV or JSONL file -> score samples (one of the ten questions drawn per row).

    Returns (samples, problems): rows without an image or a numeric score are listed in `problems`, not fatal.
    """
    path = Path(path)
    rows = _table_rows(path, fmt)
    rng = random.Random(seed)
    kept, scores, problems = [], [], []
    for number, row in enumerate(rows, 2 if fmt == "csv" else 1):
        image, score = _pick(row, IMAGE_COLUMNS), _pick(row, SCORE_COLUMNS)
        try:
            score = float(score)
        except (TypeError, ValueError):
            score = math.nan
        if image is None or not math.isfinite(score):
            problems.append(f"{path}:{number}: needs an image ({'/'.join(IMAGE_COLUMNS)}) and a numeric score ({'/'.join(SCORE_COLUMNS)})")
            continue
        kept.append(str(image))
        scores.append(score)
    level_probs = score_to_level_probs(scores).tolist() if scores else []
    samples = [
        Sample(
            image=_resolve_image(image, image_folder, path),
            conversations=score_conversation(score, rng.choice(SCORE_QUESTIONS)),
            level_probs=probs,
            gt_score=score,
        )
        for image, score, probs in zip(kept, scores, level_probs)
    ]
    return samples, problems


def read_conversation_json(path: str | Path, image_folder: str = "") -> list[Sample]:
    """The reference's score JSON or RAD description JSON (a list of records with 'image' and 'conversations')."""
    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error}). Use a JSON list of records, or .jsonl/.csv for tables.") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records.")
    return [_sample_from_record(r, f"{path} record {i}", image_folder, path) for i, r in enumerate(records)]


def read_dataset(spec: DatasetSpec, seed: int = 0) -> list[Sample]:
    """One data file -> samples whose image file exists; rows that cannot be used are counted and warned about."""
    path = Path(spec.path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check `data` in the training config.")
    fmt = spec.format if spec.format != "auto" else {".csv": "csv", ".jsonl": "jsonl"}.get(path.suffix.lower(), "json")
    if fmt == "json":
        samples, problems = read_conversation_json(path, spec.image_folder), []
    elif fmt in ("csv", "jsonl"):
        samples, problems = read_score_table(path, spec.image_folder, fmt, seed)
    else:
        raise DataError(f"unknown data format {spec.format!r}; use auto, json, csv or jsonl.")
    present = [s for s in samples if os.path.isfile(s.image)]
    missing = len(samples) - len(present)
    if missing:
        first = next(s.image for s in samples if not os.path.isfile(s.image))
        problems.append(f"{missing} images not found (e.g. {first}); set image_folder to the folder they are in")
    for problem in problems:
        logger.warning("%s: skipped %s", path, problem)
    return present


def mix_datasets(specs: Sequence[DatasetSpec], seed: int = 0) -> list[Sample]:
    """All datasets in one list, each repeated `int(weight)` times plus a seeded random `weight % 1` share."""
    rng = random.Random(seed)
    mixed: list[Sample] = []
    for spec in specs:
        if spec.weight <= 0:
            raise DataError(f"{spec.path}: weight must be > 0, got {spec.weight}.")
        samples = read_dataset(spec, seed)
        whole = int(spec.weight)
        mixed += samples * whole + rng.sample(samples, int(len(samples) * (spec.weight - whole)))
        logger.info("%s: %d samples in the mix", spec.path, len(samples) * whole + int(len(samples) * (spec.weight - whole)))
    if not mixed:
        raise DataError("no usable training samples: check the data paths, image folders and weights.")
    return mixed


# ----------------------------------------------------------------------------------------------------------------
# Dataset and batches
# ----------------------------------------------------------------------------------------------------------------
class ConversationDataset(torch.utils.data.Dataset):
    """Samples -> dicts of `input_ids` [T], `labels` [T], `pixel_values` [3, S, S], `level_probs` [L], `task_type`.

    An image that cannot be read gives `{"error": message}` instead; the collator drops it and reports it.
    """

    def __init__(self, samples: Sequence[Sample], tokenizer: PromptTokenizer, image_config: ImageProcessingConfig,
                 max_length: int = 2048):
        self.samples = list(samples)
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        try:
            image = read_image(sample.image)
        except ImageInputError as error:
            return {"error": str(error)}
        input_ids, labels = tokenize_conversation(self.tokenizer, sample.conversations)
        return {
            "input_ids": torch.tensor(input_ids[: self.max_length]),
            "labels": torch.tensor(labels[: self.max_length]),
            "pixel_values": pixel_values_from_images(image[None], self.image_config)[0],
            "level_probs": torch.tensor(sample.level_probs or [0.0] * len(ARTQUANT_LEVELS), dtype=torch.float32),
            "task_type": sample.task_type,
            "gt_score": math.nan if sample.gt_score is None else sample.gt_score,
        }


def pad_batch(items: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pads `input_ids` with `pad_token_id` and `labels` with `IGNORE_INDEX`, as the reference's collator."""
    input_ids = torch.nn.utils.rnn.pad_sequence([x["input_ids"] for x in items], batch_first=True, padding_value=pad_token_id)
    labels = torch.nn.utils.rnn.pad_sequence([x["labels"] for x in items], batch_first=True, padding_value=IGNORE_INDEX)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": input_ids.ne(pad_token_id),
        "pixel_values": torch.stack([x["pixel_values"] for x in items]),
        "level_probs": torch.stack([x["level_probs"] for x in items]),
    }


@dataclass
class SplitByTask:
    """Collates a list of samples into a `score` and a `description` sub-batch (either may be None).

    `skipped` lists the messages of samples whose image could not be read.
    """

    pad_token_id: int

    def __call__(self, items: Sequence[dict]) -> dict:
        usable = [x for x in items if "error" not in x]
        batch = {"skipped": [x["error"] for x in items if "error" in x], "num_samples": len(usable)}
        for task in ("score", "description"):
            chosen = [x for x in usable if x["task_type"] == task]
            batch[task] = pad_batch(chosen, self.pad_token_id) if chosen else None
        return batch
