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


def _normalised_gaussian(values: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """[N] mu, sigma -> [N, L] Gaussian density at the level values, normalised over the levels."""
    return torch.softmax(-0.5 * ((values - mu[:, None]) / sigma[:, None]) ** 2, dim=-1)


def _expected_value(values: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return _normalised_gaussian(values, mu, sigma) @ values


def score_to_level_probs(
    scores,
    weights: Sequence[float] = ARTQUANT_WEIGHTS,
    mu_bounds: tuple[float, float] = (-10.0, 10.0),
    sigma_bounds: tuple[float, float] = (1e-3, 1e3),
    scan_steps: int = 256,
    bisection_steps: int = 40,
) -> torch.Tensor:
    """Score-based distribution estimation: human scores [N] -> target level probabilities [N, L] (float64).

    The reference fits, per score s, a Gaussian (mu, sigma) whose normalised density at the level values has
    expected value s, with scipy's L-BFGS-B started at (s, 1). The problem has a curve of solutions; L-BFGS-B's
    first step follows the gradient of the expected value and stops near where that line meets the curve. Here
    every score takes that line at once: a coarse scan finds the first crossing, bisection refines it.
    Scores outside the level range give (almost) one-hot distributions on the end levels.
    """
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    values = torch.as_tensor(weights, dtype=torch.float64)
    mu0, sigma0 = s.clone(), torch.ones_like(s)
    # Gradient of the expected value at the start (analytic: d/dmu and d/dsigma of a softmax-weighted mean).
    with torch.enable_grad():
        mu_var, sigma_var = mu0.clone().requires_grad_(), sigma0.clone().requires_grad_()
        start_value = _expected_value(values, mu_var, sigma_var)
        grad_mu, grad_sigma = torch.autograd.grad(start_value.sum(), (mu_var, sigma_var))
    start_value = start_value.detach()
    direction = torch.sign(start_value - s)  # descend |E - s|: move against the gradient when E > s
    step_mu, step_sigma = -direction * grad_mu, -direction * grad_sigma
    norm = torch.sqrt(step_mu**2 + step_sigma**2).clamp_min(1e-300)
    step_mu, step_sigma = step_mu / norm, step_sigma / norm

    def along(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = (mu0[..., None] + t * step_mu[..., None]).clamp(*mu_bounds) if t.ndim == 2 else None
        if mu is None:
            return (mu0 + t * step_mu).clamp(*mu_bounds), (sigma0 + t * step_sigma).clamp(*sigma_bounds)
        return mu, (sigma0[..., None] + t * step_sigma[..., None]).clamp(*sigma_bounds)

    # Coarse scan of the first crossing of E = s (the line can meet the curve again far away).
    max_length = float(mu_bounds[1] - mu_bounds[0])
    grid = torch.linspace(0.0, max_length, scan_steps + 1, dtype=torch.float64)
    passed = torch.zeros_like(s, dtype=torch.bool)
    low, high = torch.zeros_like(s), torch.full_like(s, max_length)
    for a, b in zip(grid[:-1], grid[1:]):
        mu, sigma = along(torch.full_like(s, float(b)))
        crossed = (torch.sign(_expected_value(values, mu, sigma) - s) != direction) & ~passed
        low = torch.where(crossed, torch.full_like(s, float(a)), low)
        high = torch.where(crossed, torch.full_like(s, float(b)), high)
        passed |= crossed
        if bool(passed.all()):
            break
    for _ in range(bisection_steps):
        middle = (low + high) / 2
        mu, sigma = along(middle)
        before = torch.sign(_expected_value(values, mu, sigma) - s) == direction
        low, high = torch.where(before, middle, low), torch.where(before, high, middle)
    mu, sigma = along((low + high) / 2)
    exact = direction == 0  # (s, 1) already has the expected value s
    mu, sigma = torch.where(exact, mu0, mu), torch.where(exact, sigma0, sigma)
    return _normalised_gaussian(values, mu, sigma)
