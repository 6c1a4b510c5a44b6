"""Training data: the reference's score and RAD description JSON, and (image, score) tables, tokenised as ArtQuant.

Every sample becomes the `v1` (vicuna) conversation the reference trained on: its system prompt, the image moved to
the start of the first question, the answer tokens (and `</s>`) as labels. Score samples also carry the target level
probabilities of score-based distribution estimation.
"""

from __future__ import annotations

import csv
import io
import json
import re
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
from ..scorer.presets import ARTQUANT
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
SCORE_SCALE = ARTQUANT.score_range  # the level weights' span, 1 (bad) to 10 (excellent)
LEVEL_ANSWER = re.compile(re.escape(ANSWER_PREFIX) + r" (" + "|".join(ARTQUANT_LEVELS) + r")\b")


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
    score_range: tuple[float, float] | None = None  # the dataset's own scale, rescaled to ArtQuant's 1..10


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
# Reading data files: every record is checked when the file is read, so a bad one is named before training starts
# ----------------------------------------------------------------------------------------------------------------
def _resolve_image(image: str, image_folder: str, data_file: Path) -> str:
    if os.path.isabs(image):
        return image
    return str(Path(image_folder or data_file.parent) / image)


def _pick(row: dict, names: Sequence[str]):
    return next((row[n] for n in names if n in row and row[n] not in (None, "")), None)


def _number(value, what: str) -> float:
    """A finite number from JSON or a CSV cell; DataError (the message says what was found) otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise DataError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise DataError(f"{what} must be a finite number, got {value!r}")
    return number


def _scaled_score(value, score_range: Sequence[float] | None) -> float:
    """The score on ArtQuant's scale (1..10): rescaled linearly from `score_range` when the dataset names one."""
    score = _number(value, "the score")
    low, high = SCORE_SCALE
    if score_range is None:
        if not low <= score <= high:
            raise DataError(f"score {score:g} is outside ArtQuant's scale {low:g}..{high:g}; if the dataset uses "
                            "another scale, name it in the config (e.g. score_range: [0, 100]) to rescale it")
        return score
    first, last = score_range
    if not first <= score <= last:
        raise DataError(f"score {score:g} is outside the dataset's score_range {first:g}..{last:g}")
    return low + (score - first) * (high - low) / (last - first)


def _check_level_probs(value) -> list[float]:
    if not isinstance(value, list) or len(value) != len(ARTQUANT_LEVELS):
        raise DataError(f"level_probs must be a list of {len(ARTQUANT_LEVELS)} probabilities "
                        f"({', '.join(ARTQUANT_LEVELS)}), got {value!r}")
    probs = [_number(p, "each of level_probs") for p in value]
    if min(probs) < 0 or abs(sum(probs) - 1) > 1e-3:
        raise DataError(f"level_probs must be >= 0 and sum to 1, got {value!r}")
    return probs


def _check_conversation(turns, task_type: str) -> None:
    """The checks `tokenize_conversation` and the loss would otherwise make at the sample's first batch."""
    if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
        raise DataError("conversations must be a list of {\"from\": \"human\"|\"gpt\", \"value\": text}")
    roles = [t.get("from") for t in turns]
    if roles[:1] == ["gpt"]:
        roles = roles[1:]  # the reference drops a leading assistant turn
    if len(roles) < 2 or roles != ["human", "gpt"] * (len(roles) // 2):
        raise DataError(f"conversations must alternate human, gpt turns, got {[t.get('from') for t in turns]}")
    if sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns) != 1:
        raise DataError(f"conversations must hold exactly one {IMAGE_PLACEHOLDER} (one image per sample)")
    answers = " ".join(t["value"] for t in turns if t.get("from") == "gpt")
    if task_type == "score" and not LEVEL_ANSWER.search(answers):
        raise DataError(f"a score answer must read '{ANSWER_PREFIX} <level>.' with a level in "
                        f"{', '.join(ARTQUANT_LEVELS)}")


def sample_from_record(record, spec: DatasetSpec, data_file: Path, rng: random.Random) -> Sample:
    """One record (a JSON object, a JSONL line or a CSV row) -> a Sample; DataError says what is wrong with it.

    A record with `conversations` is the reference's format; one with only an image and a score becomes a score
    sample with one of the ten questions drawn by `rng`.
    """
    if not isinstance(record, dict):
        raise DataError(f"expected an object with an image and a score or conversations, got {record!r:.80}")
    image = _pick(record, IMAGE_COLUMNS)
    if isinstance(image, list):
        raise DataError("several images per sample are not supported; use one image per record")
    if not isinstance(image, str):
        raise DataError(f"needs an image ({'/'.join(IMAGE_COLUMNS)}), got {image!r}")
    task_type = record.get("task_type", "score")
    if task_type not in ("score", "description"):
        raise DataError(f"task_type must be 'score' or 'description', got {task_type!r}")
    raw_score = _pick(record, SCORE_COLUMNS)
    score = None if raw_score is None else _scaled_score(raw_score, spec.score_range)
    conversations = record.get("conversations")
    level_probs = None
    if task_type == "score":
        if record.get("level_probs") is not None:
            level_probs = _check_level_probs(record["level_probs"])
        elif score is None:
            raise DataError(f"a score sample needs a score ({'/'.join(SCORE_COLUMNS)}) or level_probs")
        if conversations is None:
            if score is None:
                raise DataError(f"needs a score ({'/'.join(SCORE_COLUMNS)}) to build its conversation")
            conversations = score_conversation(score, rng.choice(SCORE_QUESTIONS))
    elif conversations is None:
        raise DataError("a description sample needs 'conversations'")
    _check_conversation(conversations, task_type)
    return Sample(_resolve_image(image, spec.image_folder, data_file), conversations, task_type, level_probs, score)


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # Excel's "CSV UTF-8" starts with a byte-order mark
    except UnicodeDecodeError as error:
        utf16 = " (it looks like UTF-16, Excel's 'Unicode Text')" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise DataError(f"{path} is not UTF-8 text{utf16}: byte {raw[error.start]:#04x} at position {error.start}. "
                        "Save it as UTF-8 (in Excel: 'CSV UTF-8').") from None


def _records(path: Path, fmt: str) -> list[tuple[str, object]]:
    """(where, record) for every record of a file; `where` is how messages name it."""
    text = _read_text(path)
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            return [(f"{path} row {reader.line_num}", row) for row in reader]
        except csv.Error as error:
            raise DataError(f"{path} near line {reader.line_num + 1}: not a CSV row ({error}).") from None
    if fmt == "jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append((f"{path} line {number}", json.loads(line)))
                except json.JSONDecodeError as error:
                    raise DataError(f"{path} line {number}: not a JSON line ({error}).") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error}). Use a JSON list of records, or .jsonl/.csv for "
                        "tables.") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got a {type(records).__name__}.")
    return [(f"{path} record {index}", record) for index, record in enumerate(records)]


def read_samples(spec: DatasetSpec, seed: int = 0) -> tuple[list[Sample], list[dict]]:
    """Every usable record of one data file, and the unusable ones as {"record", "image", "error"} (a file that cannot
    be read at all raises DataError). Image files are not checked here."""
    path = Path(spec.path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check `data` in the training config.")
    fmt = spec.format if spec.format != "auto" else {".csv": "csv", ".jsonl": "jsonl"}.get(path.suffix.lower(), "json")
    if fmt not in ("json", "csv", "jsonl"):
        raise DataError(f"unknown data format {spec.format!r}; use auto, json, csv or jsonl.")
    rng = random.Random(seed)
    samples, problems = [], []
    for where, record in _records(path, fmt):
        try:
            samples.append(sample_from_record(record, spec, path, rng))
        except DataError as error:
            image = _pick(record, IMAGE_COLUMNS) if isinstance(record, dict) else None
            problems.append({"record": where, "image": image if isinstance(image, str) else None,
                             "error": f"{where}: {error}"})
    estimate = [s for s in samples if s.task_type == "score" and s.level_probs is None]
    if estimate:  # one vectorised fit for the whole file
        for sample, probs in zip(estimate, score_to_level_probs([s.gt_score for s in estimate]).tolist()):
            sample.level_probs = probs
    return samples, problems


def read_dataset(spec: DatasetSpec, seed: int = 0) -> list[Sample]:
    """One training data file -> its samples whose image file exists. Any invalid record refuses the whole file
    (DataError listing them); missing images are skipped with a warning."""
    samples, problems = read_samples(spec, seed)
    if problems:
        listed = "\n  ".join(p["error"] for p in problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise DataError(f"{spec.path}: {len(problems)} of {len(samples) + len(problems)} records cannot be used; fix "
                        f"or remove them:\n  {listed}{more}")
    present = [s for s in samples if os.path.isfile(s.image)]
    missing = len(samples) - len(present)
    if missing:
        first = next(s.image for s in samples if not os.path.isfile(s.image))
        logger.warning("%s: skipped %d images not found (e.g. %s); set image_folder to the folder they are in",
                       spec.path, missing, first)
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
