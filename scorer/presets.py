"""Scorer presets: which checkpoint, which question, which level words and weights.

Every published mPLUG-Owl2 level-token scorer reads the next-token logits of level words after an answer prefix;
they differ only in the values below.
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

PRESETS = {p.name: p for p in (ARTQUANT, DEQA_SCORE, ONEALIGN_QUALITY, ONEALIGN_AESTHETICS)}


def get_preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.") from None
