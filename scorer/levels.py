"""The level words and what a distribution over them means: score, uncertainty, hard label.

The one place that turns level probabilities into numbers; presets carry the words and weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

ARTQUANT_LEVELS = ("excellent", "good", "fair", "poor", "bad")
ARTQUANT_WEIGHTS = (10.0, 7.5, 5.0, 3.5, 1.0)
# Upper bounds of the hard labels, best level last: <= 1 bad, <= 3.5 poor, <= 5 fair, <= 7.5 good, else excellent.
ARTQUANT_THRESHOLDS = (1.0, 3.5, 5.0, 7.5)


def expected_score(level_probs: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """[..., L] probabilities -> [...] score = sum(p_i * w_i)."""
    return level_probs @ torch.as_tensor(weights, dtype=level_probs.dtype, device=level_probs.device)


def score_std(level_probs: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """[..., L] probabilities -> [...] std = sqrt(sum(p_i * (w_i - score)^2)), the rating's uncertainty."""
    w = torch.as_tensor(weights, dtype=level_probs.dtype, device=level_probs.device)
    score = level_probs @ w
    return ((level_probs * (w - score.unsqueeze(-1)) ** 2).sum(-1)).clamp_min(0).sqrt()


def hard_label(score: float, levels: Sequence[str] = ARTQUANT_LEVELS, thresholds=ARTQUANT_THRESHOLDS) -> str:
    """The level word the reference's training answers use for a human score."""
    worst_first = list(reversed(levels))
    for bound, level in zip(thresholds, worst_first):
        if score <= bound:
            return level
    return levels[0]
