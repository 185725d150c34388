"""Ling scaling laws (arXiv 2507.17702, FACTS §6): optimal LR and batch, the compute-optimal
model/data split and the efficiency leverage (EL) of an MoE configuration.

C is training compute in FLOPs; M is the *non-embedding* training FLOPs per token (forward +
backward, attention included, MTP excluded), so C = M·D for D training tokens. The fits cover
C = 3e17 … 3e20; beyond that the numbers are extrapolations (flagged by ``in_fitted_range``).
Log bases (not stated in the paper): log10 for C and ln for G, which reproduce EL ≈ 7 at
A = 3.1 %, G = 12, C = 1e22 (FACTS §6).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_ling.errors import LingConfigError
from megatron_ling.models.config import LingConfig

FITTED_RANGE = (3e17, 3e20)
# EL fit constants
EL_A, EL_D, EL_GAMMA, EL_BETA = 1.23, -7.61e-2, 1.67e-2, -1.17e-1
A_START, A_MAX = 1.63e-2, 5.28e16
# Ling 2.0 report Table 1 (FACTS §1): peak LR and batch size as published (batch in sequences)
PUBLISHED = {"ling-mini-2.0": (3.36e-4, 4400), "ling-flash-2.0": (2.61e-4, 8352), "ling-1t": (1.86e-4, 18144)}


def check_compute(c: float, what: str = "--compute") -> float:
    if not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0):
        raise LingConfigError(f"{what}: the compute budget must be a positive number of FLOPs (e.g. 1e22), got {c!r}")
    return float(c)


def lr_opt(c: float) -> float:
    return 1.1576 * check_compute(c) ** -0.1529


def batch_opt(c: float) -> float:
    """Optimal batch size in tokens."""
    return 0.0694 * check_compute(c) ** 0.3644


def compute_optimal(c: float, moe: bool = True) -> tuple[float, float]:
    """(M_opt non-embedding FLOPs per token, D_opt tokens) for compute C."""
    c = check_compute(c)
    if moe:
        return 0.1915 * c ** 0.5095, 5.2232 * c ** 0.4905
    return 0.0655 * c ** 0.5422, 15.2582 * c ** 0.4578


def activation_ratio(cfg: LingConfig) -> float:
    """A = (activated + shared experts) / (total + shared experts)."""
    return (cfg.num_experts_per_tok + cfg.num_shared_experts) / (cfg.num_experts + cfg.num_shared_experts)


def granularity(cfg: LingConfig) -> float:
    """G = 2·d_model / d_expert."""
    return 2 * cfg.hidden_size / cfg.moe_intermediate_size


def efficiency_leverage(a: float, g: float, c: float) -> float:
    """EL(A, G, C): compute-equivalent gain of the MoE over a dense model at compute C."""
    c = check_compute(c)
    if not 0 < a <= 1:
        raise LingConfigError(f"activation ratio: must be in (0, 1], got {a}")
    if not g > 0:
        raise LingConfigError(f"granularity: must be > 0, got {g}")
    a_hat = 1.0 / (1.0 / (a + 1.0 / (1.0 / A_START - 1.0 / A_MAX)) + 1.0 / A_MAX)
    alpha = EL_A + EL_D * math.log10(c)
    lg = math.log(g)
    return a_hat ** (alpha + EL_GAMMA * lg * lg + EL_BETA * lg)


def non_embedding_flops_per_token(cfg: LingConfig, seq_length: int) -> float:
    """M: forward + backward FLOPs per token of the decoder layers (no embedding, output layer or
    MTP), from the profiling cost model's per-layer counts."""
    from megatron_ling.pipeline.costmodel import CostModel, CostOptions

    cm = CostModel(cfg, CostOptions(seq_length=seq_length))
    k = cfg.first_k_dense_replace
    return 3 * (k * cm.flops_per_token("D") + (cfg.num_hidden_layers - k) * cm.flops_per_token("M"))


@dataclass
class HParams:
    compute: float
    lr_opt: float
    batch_opt_tokens: float
    m_opt: float
    d_opt: float
    dense_m_opt: float
    dense_d_opt: float

    @property
    def in_fitted_range(self) -> bool:
        return FITTED_RANGE[0] <= self.compute <= FITTED_RANGE[1]


def hparams(c: float) -> HParams:
    m, d = compute_optimal(c, moe=True)
    dm, dd = compute_optimal(c, moe=False)
    return HParams(compute=check_compute(c), lr_opt=lr_opt(c), batch_opt_tokens=batch_opt(c), m_opt=m, d_opt=d,
                   dense_m_opt=dm, dense_d_opt=dd)
