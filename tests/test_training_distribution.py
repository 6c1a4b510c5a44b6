"""Score-based distribution estimation (scorer.levels.score_to_level_probs) against the reference's Gaussian fit."""

from __future__ import annotations

import torch

from artquant.scorer.levels import ARTQUANT_WEIGHTS, expected_score, score_to_level_probs


def test_reproduces_the_reference_table(golden):
    table = golden["score_to_level_probs"]
    scores = [float(s) for s in table]
    expected = torch.tensor(list(table.values()), dtype=torch.float64)
    estimated = score_to_level_probs(scores)
    assert estimated.shape == (len(scores), 5)
    assert (estimated - expected).abs().max() <= 1e-3


def test_distributions_are_valid_and_keep_the_score():
    scores = torch.linspace(1.2, 9.8, 200)
    probs = score_to_level_probs(scores)
    assert torch.allclose(probs.sum(-1), torch.ones(200, dtype=torch.float64))
    assert (probs >= 0).all()
    assert torch.allclose(expected_score(probs, ARTQUANT_WEIGHTS), scores.double(), atol=1e-4)


def test_out_of_range_scores_go_to_the_end_levels():
    probs = score_to_level_probs([0.0, 1.0, 10.0, 12.0])
    assert probs[0, -1] > 0.999 and probs[1, -1] > 0.999
    assert probs[2, 0] > 0.99 and probs[3, 0] > 0.99
