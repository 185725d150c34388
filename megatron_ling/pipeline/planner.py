"""Pipeline layout planner: uneven (even empty) stages minimising simulated iteration time.

A layout places the decoder layers (D first, then M, in model order) into ``pp * vpp`` schedule
stages; 'E' is on stage 0 and the MTP layer(s) sit with the loss 'L' on the last stage, or on their
own stage just before it (``mtp_standalone``; ``megatron_ling.parallel.layout.check_layout``). So a layout is a vector of
per-stage layer counts ``c[i] >= 0`` summing to ``num_hidden_layers``.

Search: (1) a min-max start (binary search on the largest stage time, greedy fill), (2) local
search over single-layer moves between any two stages; every move is screened by a cheap bound
(the busiest rank's compute plus the p2p chain) and the best few are scored by the full schedule
simulation (``simulator.iteration_time``). Ranks whose peak memory (parameters + activations
held by the real F/B order) exceeds ``mem_cap`` are rejected. Ling-1T at PP=21 VPP=2 (42 stages)
plans in seconds.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from megatron_ling.errors import LingConfigError
from megatron_ling.models.config import LingConfig
from megatron_ling.parallel.layout import check_layout
from megatron_ling.pipeline.costmodel import Calibration, CostModel, CostOptions, Hardware
from megatron_ling.pipeline.simulator import (check_schedule, iteration_time, peak_activation_bytes,
                                               simulate)

GiB = 1024 ** 3


def counts_to_layout(counts: list[int], mtp_layers: int, mtp_standalone: bool = False) -> str:
    stages = ["t" * c for c in counts]
    stages[0] = "E" + stages[0]
    if mtp_standalone and mtp_layers and len(stages) > 1:
        stages[-2] = stages[-2] + "m" * mtp_layers  # MTP on the stage before the loss stage
        stages[-1] = stages[-1] + "L"
    else:
        stages[-1] = stages[-1] + "m" * mtp_layers + "L"
    return "|".join(stages)


def layout_to_counts(layout: str, pp: int, cfg: LingConfig) -> list[int]:
    lay = check_layout(layout, pp, cfg.num_hidden_layers, cfg.num_nextn_predict_layers)
    flat = [lay.stages[i % pp][i // pp] for i in range(pp * lay.vpp)]
    return [st.count("t") for st in flat]


def even_counts(num_layers: int, num_stages: int) -> list[int]:
    """The 'uniform split': layers spread as evenly as possible, the first stages taking the
    remainder (megatron-core's default when layers divide evenly; E, MTP and L are ignored)."""
    base, rem = divmod(num_layers, num_stages)
    return [base + (1 if i < rem else 0) for i in range(num_stages)]


@dataclass
class StageReport:
    index: int
    rank: int
    chunk: int
    units: str
    fwd_s: float
    bwd_s: float
    act_bytes: float
    param_bytes: float


@dataclass
class LayoutEval:
    layout: str
    counts: list
    iteration_s: float
    bubbles: list
    stages: list  # StageReport
    rank_mem_bytes: list
    rank_busy_s: list

    @property
    def max_mem_gib(self) -> float:
        return max(self.rank_mem_bytes) / GiB


@dataclass
class PlanResult:
    best: LayoutEval
    uniform: Optional[LayoutEval]
    evaluations: int
    seconds: float
    notes: list = field(default_factory=list)

    @property
    def gain(self) -> Optional[float]:
        """Fractional iteration-time reduction over the uniform split."""
        if self.uniform is None:
            return None
        return 1.0 - self.best.iteration_s / self.uniform.iteration_s


class _Problem:
    """Everything the search needs, precomputed as flat per-layer arrays."""

    def __init__(self, cfg: LingConfig, pp: int, vpp: int, m: int, cost: CostModel,
                 mem_cap_bytes: Optional[float], group: Optional[int] = None, mtp_standalone: bool = False):
        self.cfg, self.pp, self.vpp, self.m, self.cost = cfg, pp, vpp, m, cost
        self.S = pp * vpp
        self.N = cfg.num_hidden_layers
        self.mtp = cfg.num_nextn_predict_layers
        self.group = group
        self.cap = mem_cap_bytes
        self.lat = cost.p2p_latency_s
        kinds = [cost.layer_kind(i) for i in range(self.N)]
        self.lf = [cost.unit(k).fwd_s for k in kinds]
        self.lb = [cost.unit(k).bwd_s for k in kinds]
        self.la = [cost.unit(k).act_bytes for k in kinds]
        self.lp = [cost.unit(k).param_bytes for k in kinds]
        head = [cost.unit("E")]
        mtp_units = [cost.unit(k) for k in ["MTP_T", "MTP_L"] * self.mtp]
        # mtp_standalone: MTP on stage S-2, the loss alone on stage S-1 (layers may not follow MTP,
        # so the last stage holds no layer).
        self.standalone = bool(mtp_standalone and self.mtp and self.S > 1)
        tail = [cost.unit("L")] + ([] if self.standalone else mtp_units)
        attrs = ("fwd_s", "bwd_s", "act_bytes", "param_bytes")
        self.head = tuple(sum(getattr(u, a) for u in head) for a in attrs)
        self.tail = tuple(sum(getattr(u, a) for u in tail) for a in attrs)
        self.mtp_tail = tuple(sum(getattr(u, a) for u in mtp_units) if self.standalone else 0.0 for a in attrs)
        self.prefix = [[0.0] * (self.N + 1) for _ in range(4)]
        for i in range(self.N):
            for j, arr in enumerate((self.lf, self.lb, self.la, self.lp)):
                self.prefix[j][i + 1] = self.prefix[j][i] + arr[i]
        self.evals = 0
        self._memo: dict = {}

    def stage_values(self, counts):
        """Per stage (fwd, bwd, act, param) lists."""
        out = [[0.0] * self.S for _ in range(4)]
        lo = 0
        for i, c in enumerate(counts):
            for j in range(4):
                out[j][i] = self.prefix[j][lo + c] - self.prefix[j][lo]
            lo += c
        for j in range(4):
            out[j][0] += self.head[j]
            out[j][-1] += self.tail[j]
            if self.standalone:
                out[j][-2] += self.mtp_tail[j]
        return out

    def rank_mem(self, counts, vals=None):
        f, b, a, p = vals or self.stage_values(counts)
        mem = []
        for r in range(self.pp):
            params = sum(p[v * self.pp + r] for v in range(self.vpp))
            mem.append(params + peak_activation_bytes(r, self.pp, self.vpp, self.m, a, self.group))
        return mem

    def over_cap(self, counts, vals=None) -> float:
        if self.cap is None:
            return 0.0
        return max(0.0, max(self.rank_mem(counts, vals)) - self.cap)

    def objective(self, counts) -> float:
        key = tuple(counts)
        if key not in self._memo:
            vals = self.stage_values(counts)
            t = iteration_time(vals[0], vals[1], self.pp, self.m, self.lat, self.group)
            over = self.over_cap(counts, vals)
            # infeasible layouts rank after every feasible one, closest-to-cap first
            self._memo[key] = t + (1e9 * (1 + over / GiB) if over > 0 else 0.0)
            self.evals += 1
        return self._memo[key]

    def bound(self, counts) -> float:
        """Cheap lower-bound-like screen: busiest rank's compute, plus one pipeline fill."""
        f, b, _, _ = self.stage_values(counts)
        busiest = max(sum(f[v * self.pp + r] + b[v * self.pp + r] for v in range(self.vpp))
                      for r in range(self.pp))
        fill = sum(f) + sum(b) + 2 * self.S * self.lat
        return self.m * busiest + fill / self.vpp * (self.pp - 1) / self.pp

    def evaluate(self, counts) -> LayoutEval:
        vals = self.stage_values(counts)
        f, b, a, p = vals
        res = simulate(f, b, self.pp, self.m, self.lat, self.group)
        layout = counts_to_layout(counts, self.mtp, self.standalone)
        flat = layout.split("|")
        stages = [StageReport(i, i % self.pp, i // self.pp, flat[i], f[i], b[i], a[i], p[i]) for i in range(self.S)]
        return LayoutEval(layout=layout, counts=list(counts), iteration_s=res.iteration_s, bubbles=res.bubbles,
                          stages=stages, rank_mem_bytes=self.rank_mem(counts, vals),
                          rank_busy_s=[res.busy(r) for r in range(self.pp)])

    # ------------------------------------------------------------------ search pieces
    def minmax_start(self) -> list[int]:
        """Binary search the smallest per-stage time T that a greedy left-to-right fill meets."""
        def fill(T):
            counts, i = [], 0
            for s in range(self.S):
                fixed = (self.head[0] + self.head[1] if s == 0 else 0.0)
                fixed += (self.tail[0] + self.tail[1] if s == self.S - 1 else 0.0)
                fixed += (self.mtp_tail[0] + self.mtp_tail[1] if s == self.S - 2 else 0.0)
                if s == self.S - 1:
                    counts.append(self.N - i)
                    t = fixed + self.prefix[0][self.N] - self.prefix[0][i] + self.prefix[1][self.N] - self.prefix[1][i]
                    return counts, t <= T
                c, t = 0, fixed
                while i + c < self.N and t + self.lf[i + c] + self.lb[i + c] <= T:
                    t += self.lf[i + c] + self.lb[i + c]
                    c += 1
                counts.append(c)
                i += c
            return counts, i == self.N

        lo = 0.0
        hi = sum(self.lf) + sum(self.lb) + sum(self.head[:2]) + sum(self.tail[:2])
        best = fill(hi)[0]
        for _ in range(60):
            mid = (lo + hi) / 2
            counts, ok = fill(mid)
            if ok:
                hi, best = mid, counts
            else:
                lo = mid
        return best

    def local_search(self, counts, deadline: float, top_k: int = 32) -> list[int]:
        cur = list(counts)
        cur_obj = self.objective(cur)
        while time.time() < deadline:
            moves = []
            for i in range(self.S):
                if cur[i] == 0:
                    continue
                for j in range(self.S):
                    if i == j or (self.standalone and j == self.S - 1):
                        continue
                    cand = list(cur)
                    cand[i] -= 1
                    cand[j] += 1
                    moves.append((self.bound(cand), cand))
            moves.sort(key=lambda x: x[0])
            improved = False
            for _, cand in moves[:top_k]:
                o = self.objective(cand)
                if o < cur_obj * (1 - 1e-6):  # float noise is not an improvement
                    cur, cur_obj, improved = cand, o, True
                    break
            if not improved:
                break
        return cur

    def fixed_ok(self, counts) -> bool:
        return not (self.standalone and counts[-1])


def standalone_mtp_runnable(cfg: LingConfig, pp: int, vpp: int) -> bool:
    """MTP on its own stage before the loss stage (stage S-2: the last virtual stage of pp rank
    pp-2) trains correctly on megatron-core 0.16.1 and 0.19 with and without virtual stages (with
    megatron-ling's embedding group, parallel/layout.py, and on gloo compat's gloo_shape_exchange).
    It needs pp > 1, and with vpp > 1 pp > 2 (rank 0 may not hold it: check_layout)."""
    return bool(cfg.num_nextn_predict_layers) and pp > 1 and ((vpp or 1) == 1 or pp > 2)


def plan(cfg: LingConfig, pp: int, vpp: int, num_microbatches: int, opts: CostOptions,
         mem_cap_gib: Optional[float] = None, calibration: Optional[Calibration] = None,
         hardware: Optional[Hardware] = None, group: Optional[int] = None,
         time_budget_s: float = 20.0, mtp_standalone: Optional[bool] = None) -> PlanResult:
    """Search the layout minimising simulated iteration time; also evaluates the uniform split.

    ``mtp_standalone``: None (default) also tries the MTP layer on its own stage before the loss
    stage (what Ling 2.0 does) wherever megatron-core can run it (``standalone_mtp_runnable``) and
    keeps the faster plan; True forces it; False keeps MTP with the loss.
    """
    if mtp_standalone is None:
        kw = dict(mem_cap_gib=mem_cap_gib, calibration=calibration, hardware=hardware, group=group,
                  time_budget_s=time_budget_s)
        if not standalone_mtp_runnable(cfg, pp, vpp):
            return _plan(cfg, pp, vpp, num_microbatches, opts, mtp_standalone=False, **kw)
        results, errors = [], []
        for standalone in (False, True):  # either placement may be the one that fits a memory cap
            try:
                results.append(_plan(cfg, pp, vpp, num_microbatches, opts, mtp_standalone=standalone, **kw))
            except LingConfigError as e:
                errors.append(e)
        if not results:
            raise errors[0]
        return min(results, key=lambda r: r.best.iteration_s)
    return _plan(cfg, pp, vpp, num_microbatches, opts, mem_cap_gib=mem_cap_gib, calibration=calibration,
                 hardware=hardware, group=group, time_budget_s=time_budget_s, mtp_standalone=mtp_standalone)


def _plan(cfg: LingConfig, pp: int, vpp: int, num_microbatches: int, opts: CostOptions,
          mem_cap_gib: Optional[float], calibration: Optional[Calibration], hardware: Optional[Hardware],
          group: Optional[int], time_budget_s: float, mtp_standalone: bool) -> PlanResult:
    t0 = time.time()
    vpp = vpp or 1
    if pp < 1:
        raise LingConfigError(f"--pp: must be >= 1, got {pp}")
    units = cfg.num_hidden_layers + 2 + cfg.num_nextn_predict_layers
    if pp > units:
        raise LingConfigError(f"--pp: pp={pp} is larger than the {units} scheduling units of this model "
                              f"(E + {cfg.num_hidden_layers} layers + {cfg.num_nextn_predict_layers} MTP + L); "
                              f"use pp <= {units}")
    check_schedule(pp, vpp, num_microbatches, group)
    cost = CostModel(cfg, opts, hardware, calibration)
    cap = mem_cap_gib * GiB if mem_cap_gib else None
    prob = _Problem(cfg, pp, vpp, num_microbatches, cost, cap, group, mtp_standalone)
    notes = []
    even = even_counts(prob.N, prob.S)
    # the even split with the loss stage emptied of layers (they go to the lightest other stages)
    light = list(even)
    for _ in range(light[-1]):
        light[light.index(min(light[:-1]))] += 1
    light[-1] = 0
    starts = [light, prob.minmax_start()] + ([] if prob.standalone else [even])
    if prob.standalone:  # no layer may follow the MTP layer: the loss stage holds none
        for c in starts:
            c[-2] += c[-1]
            c[-1] = 0
    deadline = t0 + time_budget_s
    best = None
    # most promising start first; a start far behind the best result so far is not refined
    for s in sorted(starts, key=prob.objective):
        if best is not None and prob.objective(s) > 1.05 * prob.objective(best):
            continue
        c = prob.local_search(s, deadline)
        if best is None or prob.objective(c) < prob.objective(best):
            best = c
    if prob.over_cap(best) > 0:
        raise LingConfigError(f"--mem-cap: no layout found under {mem_cap_gib} GiB per rank (best needs "
                              f"{max(prob.rank_mem(best)) / GiB:.1f} GiB); raise the cap, pp, tp/ep or use recompute")
    if time.time() > deadline:
        notes.append(f"search stopped at the {time_budget_s:.0f} s budget")
    # the baseline is always the stock layout (MTP with the loss), whatever was searched
    stock = prob if not prob.standalone else _Problem(cfg, pp, vpp, num_microbatches, cost, cap, group)
    uni = stock.evaluate(even_counts(prob.N, prob.S))
    if stock.over_cap(uni.counts) > 0:
        notes.append("the uniform split exceeds the memory cap")
    best_eval = prob.evaluate(best)
    check_layout(best_eval.layout, pp, cfg.num_hidden_layers, cfg.num_nextn_predict_layers, vpp)
    if prob.standalone:
        notes.append("MTP on its own stage before the loss stage")
    return PlanResult(best=best_eval, uniform=uni, evaluations=prob.evals, seconds=time.time() - t0, notes=notes)


def evaluate_layout(cfg: LingConfig, layout: str, pp: int, num_microbatches: int, opts: CostOptions,
                    calibration: Optional[Calibration] = None, hardware: Optional[Hardware] = None,
                    group: Optional[int] = None) -> LayoutEval:
    """Simulate a given layout string."""
    counts = layout_to_counts(layout, pp, cfg)
    vpp = len(counts) // pp
    check_schedule(pp, vpp, num_microbatches, group)
    prob = _Problem(cfg, pp, vpp, num_microbatches, CostModel(cfg, opts, hardware, calibration), None, group)
    ev = prob.evaluate(counts)
    ev.layout = layout
    return ev


def all_layouts(cfg: LingConfig, pp: int, vpp: int = 1):
    """Every valid layout (counts vector) - for exhaustive checks on small cases."""
    S, N = pp * vpp, cfg.num_hidden_layers

    def rec(prefix, left):
        if len(prefix) == S - 1:
            yield prefix + [left]
            return
        for c in range(left + 1):
            yield from rec(prefix + [c], left - c)

    yield from rec([], N)


def plan_layout(ling_cfg: LingConfig, parallel_cfg, seq_length: int, micro_batch_size: int,
                num_microbatches: int, calibration: Optional[Calibration] = None,
                mem_cap_gib: Optional[float] = None, recompute: str = "none") -> str:
    """Resolve ``parallel.pipeline_layout: auto``: the planned megatron-core layout string.

    ``parallel_cfg`` is a ``megatron_ling.parallel.config.ParallelConfig`` (tp, pp, vpp, ep, cp
    are used). ``calibration`` may be a ``Calibration`` or a path to a calibration JSON.
    """
    if isinstance(calibration, str):
        calibration = Calibration.load(calibration)
    opts = CostOptions(seq_length=seq_length, micro_batch_size=micro_batch_size, tp=parallel_cfg.tp,
                       ep=parallel_cfg.ep, cp=parallel_cfg.cp, recompute=recompute)
    res = plan(ling_cfg, parallel_cfg.pp, parallel_cfg.vpp or 1, num_microbatches, opts,
               mem_cap_gib=mem_cap_gib, calibration=calibration, time_budget_s=20.0)
    return res.best.layout
