"""The level words and what a distribution over them means: score, uncertainty, hard label.

The one place that turns level probabilities into numbers; presets carry the words and weights.
"""

from __future__ import annotations

import math
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



# ----------------------------------------------------------------------------------------------------------------
# Score-based distribution estimation: the reference's Gaussian fit, vectorised
# ----------------------------------------------------------------------------------------------------------------
# The reference (preprocess/preprocess.ipynb) fits, per human score s, a Gaussian (mu, sigma) whose density at the
# level values, normalised, has expected value s: scipy's L-BFGS-B on |E(mu, sigma) - s| from (s, 1), bounds
# mu in [-10, 10], sigma in [1e-3, 1e3]. The problem has a curve of exact solutions, so *which* one it returns is
# decided by the optimiser's path. Below is that path for all scores at once: the same forward-difference gradient,
# the same L-BFGS directions and the same Moré-Thuente line search (MINPACK-2's dcsrch/dcstep) with L-BFGS-B's
# settings. The fixture's table is met to 3e-6; on random scores 99% agree with scipy to 1e-4, the rest (where
# scipy's line search fails and it restarts, which is not replayed) to 2e-3. 70,000 distinct scores take ~1.8 s.
_FD_STEP = 1e-8  # scipy's default absolute finite-difference step for L-BFGS-B
_LINE_SEARCH = {"ftol": 1e-3, "gtol": 0.9, "xtol": 0.1, "max_evaluations": 20}
_FACTR_EPS = 1e7 * 2.220446049250313e-16  # scipy's default ftol for L-BFGS-B (factr * machine epsilon)
_PGTOL = 1e-5


def _gaussian_level_mean(values: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """[N] -> [N] expected level value under the Gaussian density at `values`, normalised over the levels."""
    log_density = ((values - mu[:, None]) / sigma[:, None]).square_().mul_(-0.5)  # in place: this is the hot loop
    # Levels below e^-700 of the largest add nothing; clamping keeps exp() out of slow subnormal arithmetic.
    density = log_density.sub_(log_density.amax(-1, keepdim=True)).clamp_min_(-700.0).exp_()
    return (density @ values) / density.sum(-1)


def _fit_objective(values, target, x):
    """|E(mu, sigma) - s| [N] and its forward-difference gradient [N, 2], as scipy computes it."""
    mu, sigma = x[:, 0], x[:, 1]
    step_mu, step_sigma = (mu + _FD_STEP) - mu, (sigma + _FD_STEP) - sigma
    # One pass over the point and its two nudged copies.
    means = _gaussian_level_mean(values, torch.cat([mu, mu + step_mu, mu]), torch.cat([sigma, sigma, sigma + step_sigma]))
    f, f_mu, f_sigma = (means - target.repeat(3)).abs().view(3, -1)
    return f, torch.stack([(f_mu - f) / step_mu, (f_sigma - f) / step_sigma], -1)


def _cubic_step(stx, fx, dx, sty, fy, dy, stp, fp, dp, bracketed, stmin, stmax):
    """MINPACK-2 `dcstep`: the safeguarded next trial step and the updated interval of uncertainty."""
    sgnd = dp * torch.sign(dx)
    theta = 3 * (fx - fp) / (stp - stx) + dx + dp
    scale = torch.maximum(torch.maximum(theta.abs(), dx.abs()), dp.abs())
    disc = (theta / scale) ** 2 - (dx / scale) * (dp / scale)
    # 1: higher value -> the minimum is bracketed; cubic step, or halfway to the quadratic one.
    gamma = scale * disc.sqrt() * torch.where(stp < stx, -1.0, 1.0)
    stpc = stx + ((gamma - dx) + theta) / (((gamma - dx) + gamma) + dp) * (stp - stx)
    stpq = stx + ((dx / ((fx - fp) / (stp - stx) + dx)) / 2) * (stp - stx)
    step1 = torch.where((stpc - stx).abs() < (stpq - stx).abs(), stpc, stpc + (stpq - stpc) / 2)
    # 2: lower value, derivative changes sign -> bracketed; the step farther from stp.
    gamma = scale * disc.sqrt() * torch.where(stp > stx, -1.0, 1.0)
    stpc = stp + ((gamma - dp) + theta) / (((gamma - dp) + gamma) + dx) * (stx - stp)
    stpq = stp + (dp / (dp - dx)) * (stx - stp)
    step2 = torch.where((stpc - stp).abs() > (stpq - stp).abs(), stpc, stpq)
    # 3: lower value, same sign, |derivative| decreases -> cubic if it points the right way, else the end.
    gamma = scale * disc.clamp_min(0).sqrt() * torch.where(stp > stx, -1.0, 1.0)
    ratio = ((gamma - dp) + theta) / ((gamma + (dx - dp)) + gamma)
    stpc = torch.where((ratio < 0) & (gamma != 0), stp + ratio * (stx - stp), torch.where(stp > stx, stmax, stmin))
    stpq = stp + (dp / (dp - dx)) * (stx - stp)
    nearer = torch.where((stpc - stp).abs() < (stpq - stp).abs(), stpc, stpq)
    limit = stp + 0.66 * (sty - stp)
    inside = torch.where(stp > stx, torch.minimum(limit, nearer), torch.maximum(limit, nearer))
    farther = torch.where((stpc - stp).abs() > (stpq - stp).abs(), stpc, stpq)
    step3 = torch.where(bracketed, inside, torch.maximum(torch.minimum(farther, stmax), stmin))
    # 4: lower value, same sign, |derivative| does not decrease -> cubic on (stp, sty), or the end.
    theta4 = 3 * (fp - fy) / (sty - stp) + dy + dp
    scale4 = torch.maximum(torch.maximum(theta4.abs(), dy.abs()), dp.abs())
    gamma = scale4 * ((theta4 / scale4) ** 2 - (dy / scale4) * (dp / scale4)).sqrt() * torch.where(stp > sty, -1.0, 1.0)
    stpc = stp + ((gamma - dp) + theta4) / (((gamma - dp) + gamma) + dy) * (sty - stp)
    step4 = torch.where(bracketed, stpc, torch.where(stp > stx, stmax, stmin))

    higher = fp > fx
    opposite = ~higher & (sgnd < 0)
    decreasing = ~higher & ~opposite & (dp.abs() < dx.abs())
    new_step = torch.where(higher, step1, torch.where(opposite, step2, torch.where(decreasing, step3, step4)))
    moves_y = higher | opposite
    sty, fy, dy = (torch.where(higher, stp, torch.where(opposite, stx, sty)), torch.where(higher, fp, torch.where(opposite, fx, fy)),
                   torch.where(higher, dp, torch.where(opposite, dx, dy)))
    stx, fx, dx = torch.where(higher, stx, stp), torch.where(higher, fx, fp), torch.where(higher, dx, dp)
    return stx, fx, dx, sty, fy, dy, bracketed | moves_y, new_step


def _line_search(values, target, x, f, g, direction, stpmax):
    """MINPACK-2 `dcsrch` along `direction` from x for all rows at once (rows leave as they finish); returns the
    accepted x, f, g and which rows converged within L-BFGS-B's 20 evaluations."""
    ftol, gtol, xtol = _LINE_SEARCH["ftol"], _LINE_SEARCH["gtol"], _LINE_SEARCH["xtol"]
    ginit = (g * direction).sum(-1)
    new_x, new_f, new_g = x.clone(), f.clone(), g.clone()
    finished = torch.zeros_like(f, dtype=torch.bool)
    stp = torch.ones_like(f).minimum(stpmax)
    zero = torch.zeros_like(f)
    state = {
        "row": torch.arange(len(f)), "stp": stp, "stpmax": stpmax, "finit": f, "ginit": ginit, "gtest": ftol * ginit,
        "stx": zero, "fx": f, "gx": ginit, "sty": zero, "fy": f, "gy": ginit, "stmin": zero, "stmax": 5.0 * stp,
        "width": stpmax, "width1": 2 * stpmax, "bracketed": torch.zeros_like(finished), "stage_one": ~finished,
    }
    state = {k: v[ginit < 0] for k, v in state.items()}  # not a descent direction: L-BFGS-B stops there
    for _ in range(_LINE_SEARCH["max_evaluations"]):
        if not len(state["row"]):
            break
        row, stp, gtest, ginit_rows = state["row"], state["stp"], state["gtest"], state["ginit"]
        trial = x[row] + stp[:, None] * direction[row]
        ft, gt = _fit_objective(values, target[row], trial)
        dt = (gt * direction[row]).sum(-1)
        new_x[row], new_f[row], new_g[row] = trial, ft, gt
        stx, fx, gx, sty, fy, gy = (state[k] for k in ("stx", "fx", "gx", "sty", "fy", "gy"))
        bracketed, stmin, stmax = state["bracketed"], state["stmin"], state["stmax"]
        ftest = state["finit"] + stp * gtest
        stage_one = state["stage_one"] & ~((ft <= ftest) & (dt >= 0))
        done = bracketed & ((stp <= stmin) | (stp >= stmax) | (stmax - stmin <= xtol * stmax))
        done |= (stp == state["stpmax"]) & (ft <= ftest) & (dt <= gtest)
        done |= (stp == 0) & ((ft > ftest) | (dt >= gtest))
        done |= (ft <= ftest) & (dt.abs() <= gtol * -ginit_rows)
        finished[row[done]] = True
        # Stage one uses the function minus its sufficient-decrease line while that is still positive.
        shift = torch.where(stage_one & (ft <= fx) & (ft > ftest), gtest, 0.0)
        stx, fx, gx, sty, fy, gy, bracketed, stp = _cubic_step(
            stx, fx - stx * shift, gx - shift, sty, fy - sty * shift, gy - shift, stp, ft - stp * shift, dt - shift,
            bracketed, stmin, stmax)
        fx, gx, fy, gy = fx + stx * shift, gx + shift, fy + sty * shift, gy + shift
        width, width1 = state["width"], state["width1"]
        stp = torch.where(bracketed & ((sty - stx).abs() >= 0.66 * width1), stx + 0.5 * (sty - stx), stp)
        width1, width = torch.where(bracketed, width, width1), torch.where(bracketed, (sty - stx).abs(), width)
        stmin = torch.where(bracketed, torch.minimum(stx, sty), stp + 1.1 * (stp - stx))
        stmax = torch.where(bracketed, torch.maximum(stx, sty), stp + 4.0 * (stp - stx))
        stp = stp.clamp_min(0.0).minimum(state["stpmax"])
        stp = torch.where(bracketed & ((stp <= stmin) | (stp >= stmax) | (stmax - stmin <= xtol * stmax)), stx, stp)
        state.update(stp=stp, stx=stx, fx=fx, gx=gx, sty=sty, fy=fy, gy=gy, bracketed=bracketed, stage_one=stage_one,
                     stmin=stmin, stmax=stmax, width=width, width1=width1)
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)  # one index for all twenty tensors, not a mask each
            state = {k: v.index_select(0, keep) for k, v in state.items()}
    return new_x, new_f, new_g, finished


def _lbfgs_direction(g, pairs):
    """-H g by the L-BFGS two-loop recursion over (s, y, usable) pairs, oldest first; -g without pairs."""
    q = -g
    alphas = []
    for s, y, usable in reversed(pairs):
        rho = torch.where(usable, 1.0 / (s * y).sum(-1), 0.0)
        alphas.append(rho * (s * q).sum(-1))
        q = q - alphas[-1][:, None] * y
    gamma = torch.ones_like(g[:, 0])
    for s, y, usable in pairs:
        gamma = torch.where(usable, (s * y).sum(-1) / (y * y).sum(-1), gamma)
    q = q * gamma[:, None]
    for (s, y, usable), alpha in zip(pairs, reversed(alphas)):
        rho = torch.where(usable, 1.0 / (s * y).sum(-1), 0.0)
        q = q + s * (alpha - rho * (y * q).sum(-1))[:, None]
    return q


def _step_to_bounds(x, direction, lower, upper):
    """L-BFGS-B's largest step along `direction` that stays inside the box."""
    stpmax = torch.full_like(x[:, 0], 1e10)
    for i in range(x.shape[1]):
        d, room_low, room_high = direction[:, i], lower[i] - x[:, i], upper[i] - x[:, i]
        stpmax = torch.where((d < 0) & (d * stpmax < room_low), room_low / d, stpmax)
        stpmax = torch.where((d > 0) & (d * stpmax > room_high), room_high / d, stpmax)
    return stpmax.clamp_min(0)


def _fit_gaussians(target, values, lower, upper, memory=10, max_iterations=50):
    """[N] scores -> [N, 2] (mu, sigma) along scipy L-BFGS-B's path. Rows that stop leave the working set."""
    x = torch.stack([target, torch.ones_like(target)], -1)
    f, g = _fit_objective(values, target, x)
    result = x.clone()
    rows = torch.arange(len(target))
    history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for iteration in range(max_iterations):
        if iteration == 0:  # no curvature yet: the projected steepest-descent step, at most its full length
            direction = torch.maximum(torch.minimum(x - g, upper), lower) - x
            stpmax = torch.ones_like(f)
        else:
            direction = _lbfgs_direction(g, history)
            stpmax = _step_to_bounds(x, direction, lower, upper)
        new_x, new_f, new_g, accepted = _line_search(values, target[rows], x, f, g, direction, stpmax)
        step, change = new_x - x, new_g - g
        usable = accepted & ((step * change).sum(-1) > torch.finfo(x.dtype).eps * -(g * direction).sum(-1))
        x = torch.where(accepted[:, None], new_x, x)
        small_gain = (f - new_f) <= _FACTR_EPS * torch.maximum(torch.maximum(f.abs(), new_f.abs()), torch.ones_like(f))
        f, g = torch.where(accepted, new_f, f), torch.where(accepted[:, None], new_g, g)
        result[rows] = x
        going = accepted & ~small_gain & (g.abs().amax(-1) > _PGTOL)
        history = [(s[going], y[going], u[going]) for s, y, u in [*history, (step, change, usable)][-memory:]]
        rows, x, f, g = rows[going], x[going], f[going], g[going]
        if not len(rows):
            break
    return result


def score_to_level_probs(scores, weights: Sequence[float] = ARTQUANT_WEIGHTS) -> torch.Tensor:
    """Score-based distribution estimation: human scores [N] -> target level probabilities [N, L] (float64).

    The reference's Gaussian fit (see above) for every score at once; the probabilities are the Gaussian's density
    at the level values, clipped to [0, 1] and normalised, as the reference does. Scores at or beyond the ends of
    the scale give (almost) one-hot distributions on the end levels.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    target, position = torch.unique(scores, return_inverse=True)  # human scores repeat a lot: fit each value once
    values = torch.as_tensor(weights, dtype=torch.float64)
    lower = torch.tensor([-10.0, 1e-3], dtype=torch.float64)
    upper = torch.tensor([10.0, 1e3], dtype=torch.float64)
    fitted = _fit_gaussians(target, values, lower, upper)[position]
    mu, sigma = fitted[:, :1], fitted[:, 1:]
    density = torch.exp(-0.5 * ((values - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = density.clamp(0, 1)
    return density / density.sum(-1, keepdim=True)
