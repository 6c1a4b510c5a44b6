"""Scorer presets: which checkpoint, which question, which level words and weights.

Every published level-word scorer reads the next-token logits of level words after an answer prefix; they differ
only in the values below. `family` says which model runs them: "mplug_owl2" (this package's own implementation, for
ArtQuant, DeQA-Score and Q-Align) or "qwen_vl" (transformers' own Qwen-VL models, for Q-ReAlign), whose prompt is
the checkpoint's chat template rather than `template`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .levels import ARTQUANT_LEVELS, ARTQUANT_WEIGHTS

MPLUG_OWL2_TEMPLATE = "USER: {question}\n<|image|> ASSISTANT:"  # the reference's `mplug_owl2` conversation
Q_ALIGN_TEMPLATE = "USER: {question}\n<|image|>\nASSISTANT:"


@dataclass(frozen=True)
class Preset:
    name: str
    model_id: str
    base_id: str | None
    question: str
    answer_prefix: str
    level_names: tuple[str, ...]
    level_weights: tuple[float, ...]
    score_range: tuple[float, float]
    template: str = MPLUG_OWL2_TEMPLATE
    describe_question: str = "Give a comprehensive analysis of the aesthetics of this painting."
    family: str = "mplug_owl2"

    def prompt(self, question: str | None = None, answer_prefix: str | None = None) -> str:
        """The full prompt with `<|image|>` where the image goes."""
        prefix = self.answer_prefix if answer_prefix is None else answer_prefix
        return self.template.format(question=question or self.question) + prefix


ARTQUANT = Preset(
    name="artquant",
    model_id="Liuuuu123/ArtQuant",
    base_id="MAGAer13/mplug-owl2-llama2-7b",
    question="How would you rate the quality of this painting?",
    answer_prefix=" The quality of the painting is",
    level_names=ARTQUANT_LEVELS,
    level_weights=ARTQUANT_WEIGHTS,
    score_range=(1.0, 10.0),
)
"""ArtQuant (AAAI 2026), Henglin-Liu/ArtQuant `src/evaluate/iqa_eval.py`: template `mplug_owl2`, the second of the
ten score questions, weights (10, 7.5, 5, 3.5, 1) from `score_weight` in its configs; LoRA on mPLUG-Owl2."""

DEQA_SCORE = Preset(
    name="deqa-score",
    model_id="zhiyuanyou/DeQA-Score-Mix3",
    base_id=None,
    question="How would you rate the quality of this image?",
    answer_prefix=" The quality of the image is",
    level_names=ARTQUANT_LEVELS,
    level_weights=(5.0, 4.0, 3.0, 2.0, 1.0),
    score_range=(1.0, 5.0),
    template=Q_ALIGN_TEMPLATE,
    describe_question="Describe the quality of this image.",
)
"""DeQA-Score (CVPR 2025), zhiyuanyou/DeQA-Score `src/evaluate/scorer.py`: prompt and weights (5, 4, 3, 2, 1)."""

ONEALIGN_QUALITY = Preset(
    name="onealign-quality",
    model_id="q-future/one-align",
    base_id=None,
    question="How would you rate the quality of this image?",
    answer_prefix=" The quality of the image is",
    level_names=ARTQUANT_LEVELS,
    level_weights=(5.0, 4.0, 3.0, 2.0, 1.0),
    score_range=(1.0, 5.0),
    template=Q_ALIGN_TEMPLATE,
    describe_question="Describe the quality of this image.",
)
"""Q-Align / OneAlign (ICML 2024), Q-Future/Q-Align `q_align/model/modeling_mplug_owl2.py` (`score`, task "quality"):
prompt and weights (5, 4, 3, 2, 1) of the one-align release."""

ONEALIGN_AESTHETICS = Preset(
    name="onealign-aesthetics",
    model_id="q-future/one-align",
    base_id=None,
    question="How would you rate the aesthetics of this image?",
    answer_prefix=" The aesthetics of the image is",
    level_names=ARTQUANT_LEVELS,
    level_weights=(5.0, 4.0, 3.0, 2.0, 1.0),
    score_range=(1.0, 5.0),
    template=Q_ALIGN_TEMPLATE,
    describe_question="Describe the aesthetics of this image.",
)
"""Q-Align / OneAlign, task "aesthetics": Q-Future/Q-Align `q_align/evaluate/scorer.py` (`QAlignAestheticScorer`)."""

Q_REALIGN_LEVEL_WEIGHTS = (1.0, 0.75, 0.5, 0.25, 0.0)
Q_REALIGN_MODELS = {"mini": "q-future/Q-ReAlign-Mini-0.8B", "lite": "q-future/Q-ReAlign-Lite-4B",
                    "pro": "q-future/Q-ReAlign-Pro-9B"}
Q_REALIGN_TASKS = {  # task -> (question, answer prefix, description question)
    "quality": ("Can you rate the quality of this picture?", "The quality of the image is",
                "Describe the quality of this image."),
    "aesthetics": ("Can you rate the aesthetics of this picture?", "The aesthetics of the image is",
                   "Describe the aesthetics of this image."),
}


def _q_realign(size: str, task: str) -> Preset:
    question, answer_prefix, describe_question = Q_REALIGN_TASKS[task]
    return Preset(
        name=f"qrealign-{size}-{task}",
        model_id=Q_REALIGN_MODELS[size],
        base_id=None,
        question=question,
        answer_prefix=answer_prefix,
        level_names=ARTQUANT_LEVELS,
        level_weights=Q_REALIGN_LEVEL_WEIGHTS,
        score_range=(0.0, 1.0),
        template="",
        describe_question=describe_question,
        family="qwen_vl",
    )


Q_REALIGN_PRESETS = tuple(_q_realign(size, task) for size in Q_REALIGN_MODELS for task in Q_REALIGN_TASKS)
"""Q-ReAlign (Q-Future, June 2026): Q-Align's recipe retrained on Qwen3.5-VL, Mini 0.8B / Lite 4B / Pro 9B, one model
per size for quality and aesthetics. Values from chaofengc/IQA-PyTorch `pyiqa/archs/qrealign_arch.py` (`MODELS`,
`TASKS`, `LEVELS`, `WEIGHTS`), which the Q-ReAlign README names as its way to score images: the prompt is the
checkpoint's chat template over one user turn [image, question] with the generation prompt, followed by the answer
prefix with no space between; the level ids are the first tokens of " excellent" ... " bad"; weights
(1, 0.75, 0.5, 0.25, 0), so scores run from 0 (bad) to 1 (excellent). The quality question is also the Q-ReAlign
toolkit's default (`qalign/prompts.py`, first "iqa" prompt, used by `qalign/infer.py`); for aesthetics the toolkit's
first "iaa" prompt is "How is the aesthetics of this image?", pyiqa's (kept here) the one above."""

PRESETS = {p.name: p for p in (ARTQUANT, DEQA_SCORE, ONEALIGN_QUALITY, ONEALIGN_AESTHETICS, *Q_REALIGN_PRESETS)}


def get_preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.") from None
