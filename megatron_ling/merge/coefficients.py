"""WSM merge coefficients (FACTS §5, arXiv 2507.17634).

Merging checkpoints θ_0 … θ_k of one constant-LR run as θ̂ = Σ_j c_j θ_j (c_j ≥ 0, Σ c_j = 1)
equals re-weighting the updates between consecutive checkpoints by w_i = Σ_{j≥i} c_j
(i = 1 … k), i.e. it emulates an LR decay whose relative LR over update interval i is w_i.
Conversely, a target decay 1 ≥ w_1 ≥ … ≥ w_k ≥ 0 gives c_k = w_k, c_j = w_j − w_{j+1} and
c_0 = 1 − w_1.

A decay shape f(t) (f(0) = 1) is sampled at t_i = (it_i − it_0) / (it_k − it_0 + g), g the mean
spacing of the checkpoints: for evenly spaced checkpoints t_i = i/(k+1), so that ``linear``
(f = 1 − t) gives exactly the uniform mean of the k+1 checkpoints, as the paper states.
"""
from __future__ import annotations

import math

from megatron_ling.errors import LingConfigError

DECAYS = {
    "linear": lambda t, p: 1.0 - t,
    "cosine": lambda t, p: 0.5 * (1.0 + math.cos(math.pi * t)),
    "1-sqrt": lambda t, p: 1.0 - math.sqrt(t),
    "exponential": lambda t, p: math.exp(-p["exp_rate"] * t),
}
SHAPES = (*DECAYS, "mean", "ema", "weights")


def sample_points(iterations: list[int]) -> list[float]:
    """t_1 … t_k of the update intervals ending at checkpoints 1 … k (see module docstring)."""
    k = len(iterations) - 1
    if k == 0:
        return []
    span = iterations[-1] - iterations[0]
    return [(it - iterations[0]) / (span + span / k) for it in iterations[1:]]


def coefficients_from_decay(w: list[float]) -> list[float]:
    """c_0 … c_k from update weights w_1 … w_k (FACTS §5)."""
    if not w:
        return [1.0]
    return [1.0 - w[0]] + [w[j] - w[j + 1] for j in range(len(w) - 1)] + [w[-1]]


def update_weights(c: list[float]) -> list[float]:
    """w_1 … w_k = Σ_{j≥i} c_j: the LR multiplier the merge applies to each update interval."""
    return [sum(c[i:]) for i in range(1, len(c))]


def merge_coefficients(shape: str, iterations: list[int], ema_decay: float = 0.9, exp_rate: float = 5.0,
                       weights: list[float] | None = None) -> list[float]:
    """c_0 … c_k for checkpoints at ``iterations`` (ascending). One-line LingConfigError on bad input."""
    n = len(iterations)
    if shape not in SHAPES:
        raise LingConfigError(f"--shape: must be one of {', '.join(SHAPES)}, got {shape!r}")
    if shape == "weights":
        if not weights:
            raise LingConfigError("--weights: --shape weights needs one weight per checkpoint, oldest first")
        if len(weights) != n:
            raise LingConfigError(f"--weights: {len(weights)} weights for {n} checkpoints; give one per checkpoint")
        if any(not math.isfinite(x) or x < 0 for x in weights) or sum(weights) <= 0:
            raise LingConfigError("--weights: weights must be finite, >= 0 and not all 0")
        s = sum(weights)
        return [x / s for x in weights]  # relative weights: normalised to sum to 1
    if weights:
        raise LingConfigError(f"--weights: only used with --shape weights (got --shape {shape})")
    if shape == "mean":
        return [1.0 / n] * n
    if shape == "ema":
        if not 0.0 <= ema_decay < 1.0:
            raise LingConfigError(f"--ema-decay: must be in [0, 1), got {ema_decay}")
        # e_0 = θ_0, e_j = a·e_{j-1} + (1−a)·θ_j  ->  c_0 = a^k, c_j = (1−a)·a^(k−j)
        k = n - 1
        return [ema_decay ** k] + [(1.0 - ema_decay) * ema_decay ** (k - j) for j in range(1, n)]
    if shape == "exponential" and not (math.isfinite(exp_rate) and exp_rate > 0):
        raise LingConfigError(f"--exp-rate: must be > 0, got {exp_rate}")
    f = DECAYS[shape]
    w = [min(1.0, max(0.0, f(t, {"exp_rate": exp_rate}))) for t in sample_points(iterations)]
    return coefficients_from_decay(w)
