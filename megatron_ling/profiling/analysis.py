"""Bubble analysis shared by measured runs and the simulator.

A ``Timeline`` is one iteration of one pipeline: per pp rank the compute intervals (F/B, with
model chunk and micro batch) and p2p waits, on a common clock. From it:

* per rank busy / idle time and bubble fraction ``1 - busy / span``, where ``span`` runs from the
  first forward to the last backward of the iteration on any rank (the pipeline flush; gradient
  reduction and the optimizer step after it are not pipeline bubbles);
* the idle time split into warm-up (before the rank's first backward), cool-down (after its last
  forward) and steady-state stalls (in between);
* the critical path: from the last-finishing event, repeatedly step to whichever of its two
  predecessors finished last - the previous compute on the same rank, or the event it depends on
  on the neighbouring stage (the same micro batch's forward on stage s-1, or its backward on
  stage s+1; the last stage's backward depends on its own forward);
* a simulator prediction calibrated from the timeline itself (median forward/backward time per
  schedule stage, measured p2p hand-off latency and per-op overhead).
"""
from __future__ import annotations

import glob
import json
import os
import statistics
from dataclasses import dataclass, field
from typing import Optional

from megatron_ling.errors import LingConfigError

FORMAT = "megatron-ling-bubbles/1"


@dataclass
class Ev:
    kind: str  # F, B, W
    chunk: int
    mb: int
    start: float
    end: float
    flags: str = ""

    @property
    def dur(self) -> float:
        return self.end - self.start


@dataclass
class RankStats:
    rank: int
    busy_s: float
    idle_s: float
    bubble: float
    warmup_idle_s: float
    steady_idle_s: float
    cooldown_idle_s: float
    p2p_wait_s: float


@dataclass
class Timeline:
    pp: int
    vpp: int
    ranks: list  # list[list[Ev]] per pp rank, sorted by start
    t_start: float = 0.0
    t_end: float = 0.0
    iteration: Optional[int] = None

    @classmethod
    def from_events(cls, pp, vpp, events, t_end=None, iteration=None) -> "Timeline":
        ranks = []
        for evs in events:
            ranks.append(sorted((Ev(e.kind, e.chunk, e.mb, e.start, e.end) for e in evs), key=lambda e: e.start))
        return cls._finish(pp, vpp, ranks, iteration)

    @classmethod
    def _finish(cls, pp, vpp, ranks, iteration=None) -> "Timeline":
        comp = [e for evs in ranks for e in evs if e.kind in "FB"]
        if not comp:
            raise LingConfigError("bubbles: no forward/backward events recorded")
        t0 = min(e.start for e in comp)
        t1 = max(e.end for e in comp)
        return cls(pp=pp, vpp=vpp, ranks=ranks, t_start=t0, t_end=t1, iteration=iteration)

    @property
    def span(self) -> float:
        return self.t_end - self.t_start

    @property
    def num_microbatches(self) -> int:
        return 1 + max(e.mb for evs in self.ranks for e in evs if e.kind == "F")

    def stage_of(self, rank: int, chunk: int) -> int:
        return chunk * self.pp + rank

    # --------------------------------------------------------------------- statistics
    def rank_stats(self) -> list[RankStats]:
        out = []
        for r, evs in enumerate(self.ranks):
            comp = [e for e in evs if e.kind in "FB"]
            busy = sum(e.dur for e in comp)
            first_b = min((e.start for e in comp if e.kind == "B"), default=self.t_end)
            last_f = max((e.end for e in comp if e.kind == "F"), default=self.t_start)
            # idle intervals: gaps between compute events inside [t_start, t_end]
            gaps, t = [], self.t_start
            for e in sorted(comp, key=lambda e: e.start):
                if e.start > t:
                    gaps.append((t, e.start))
                t = max(t, e.end)
            if self.t_end > t:
                gaps.append((t, self.t_end))
            warm = sum(max(0.0, min(b, first_b) - a) for a, b in gaps)
            cool = sum(max(0.0, b - max(a, last_f)) for a, b in gaps)
            idle = sum(b - a for a, b in gaps)
            steady = max(0.0, idle - warm - cool)
            wait = sum(e.dur for e in evs if e.kind == "W")
            out.append(RankStats(r, busy, idle, 1.0 - busy / self.span if self.span > 0 else 0.0,
                                 warm, steady, cool, wait))
        return out

    @property
    def bubbles(self) -> list[float]:
        return [s.bubble for s in self.rank_stats()]

    def critical_path(self) -> list[tuple[int, Ev]]:
        """(rank, event) from the first to the last event on the critical path."""
        idx = {}
        for r, evs in enumerate(self.ranks):
            for e in evs:
                if e.kind in "FB":
                    idx[(e.kind, self.stage_of(r, e.chunk), e.mb)] = (r, e)
        nstage = self.pp * self.vpp
        prev_on_rank = {}
        for r, evs in enumerate(self.ranks):
            comp = sorted((e for e in evs if e.kind in "FB"), key=lambda e: e.start)
            for a, b in zip(comp, comp[1:]):
                prev_on_rank[id(b)] = a
        last = max(idx.values(), key=lambda re: re[1].end)
        path = [last]
        r, e = last
        while True:
            s = self.stage_of(r, e.chunk)
            if e.kind == "F":
                dep = idx.get(("F", s - 1, e.mb)) if s > 0 else None
            else:
                dep = idx.get(("B", s + 1, e.mb)) if s < nstage - 1 else idx.get(("F", s, e.mb))
            cands = [c for c in (dep, (r, prev_on_rank.get(id(e)))) if c and c[1] is not None]
            cands = [c for c in cands if c[1].end <= e.start + 1e-9]
            if not cands:
                break
            r, e = max(cands, key=lambda c: c[1].end)
            path.append((r, e))
        return path[::-1]

    def critical_path_summary(self) -> dict:
        path = self.critical_path()
        compute = sum(e.dur for _, e in path)
        per_rank: dict = {}
        for r, e in path:
            per_rank[r] = per_rank.get(r, 0.0) + e.dur
        return {"events": len(path), "compute_s": compute, "span_s": self.span,
                "comm_or_overhead_s": max(0.0, self.span - compute),
                "per_rank_s": dict(sorted(per_rank.items()))}

    # ---------------------------------------------------------------- self-calibration
    def stage_times(self) -> tuple[list[float], list[float]]:
        """Median forward / backward seconds of each schedule stage."""
        n = self.pp * self.vpp
        f, b = [[] for _ in range(n)], [[] for _ in range(n)]
        for r, evs in enumerate(self.ranks):
            for e in evs:
                if e.kind == "F":
                    f[self.stage_of(r, e.chunk)].append(e.dur)
                elif e.kind == "B":
                    b[self.stage_of(r, e.chunk)].append(e.dur)
        return ([statistics.median(x) if x else 0.0 for x in f], [statistics.median(x) if x else 0.0 for x in b])

    def handoff_latency(self) -> float:
        """Median delay between a stage finishing a micro batch and the next stage starting it,
        over the hand-offs where the receiving rank was waiting (its previous op had ended)."""
        idx = {}
        for r, evs in enumerate(self.ranks):
            for e in evs:
                if e.kind in "FB":
                    idx[(e.kind, self.stage_of(r, e.chunk), e.mb)] = (r, e)
        prev_end = {}
        for r, evs in enumerate(self.ranks):
            comp = sorted((e for e in evs if e.kind in "FB"), key=lambda e: e.start)
            for a, b in zip(comp, comp[1:]):
                prev_end[id(b)] = a.end
        lats = []
        n = self.pp * self.vpp
        for (kind, s, mb), (r, e) in idx.items():
            src = idx.get(("F", s - 1, mb)) if kind == "F" and s > 0 else (
                idx.get(("B", s + 1, mb)) if kind == "B" and s < n - 1 else None)
            if src is None or src[0] == r:
                continue
            pe = prev_end.get(id(e))
            if pe is not None and pe < src[1].end:  # receiver was idle when the sender finished
                lats.append(max(0.0, e.start - src[1].end))
        return statistics.median(lats) if lats else 0.0

    def op_overhead(self) -> float:
        """Typical non-compute time between back-to-back ops on a rank (python, p2p call
        overhead): the 25th percentile of the gaps between consecutive compute events."""
        gaps = []
        for evs in self.ranks:
            comp = sorted((e for e in evs if e.kind in "FB"), key=lambda e: e.start)
            gaps += [max(0.0, b.start - a.end) for a, b in zip(comp, comp[1:])]
        if not gaps:
            return 0.0
        gaps.sort()
        return gaps[len(gaps) // 4]

    def predict(self, fwd_s=None, bwd_s=None, latency_s=None, overhead_s=None) -> dict:
        """Simulated iteration and per-rank bubbles for this pipeline, from the given per-stage
        times or, by default, the times measured in this timeline."""
        from megatron_ling.profiling.simulator import simulate

        mf, mb_ = self.stage_times()
        f = list(fwd_s if fwd_s is not None else mf)
        b = list(bwd_s if bwd_s is not None else mb_)
        lat = self.handoff_latency() if latency_s is None else latency_s
        ovh = self.op_overhead() if overhead_s is None else overhead_s
        m = self.num_microbatches
        # overheads are part of each op's occupancy of its rank, but not compute
        res = simulate([x + ovh for x in f], [x + ovh for x in b], self.pp, m, lat)
        busy = [m * sum(f[v * self.pp + r] + b[v * self.pp + r] for v in range(self.vpp)) for r in range(self.pp)]
        it = res.iteration_s
        return {"iteration_s": it, "bubbles": [1.0 - x / it for x in busy], "latency_s": lat, "overhead_s": ovh,
                "fwd_s": f, "bwd_s": b, "sim": res}


# ------------------------------------------------------------------------------- runs
@dataclass
class Run:
    run_dir: str
    pp: int
    vpp: int
    meta: dict
    timelines: list = field(default_factory=list)  # one per recorded iteration
    clock: str = "perf_counter"
    alignment: str = "barrier"


def _find_dir(run_dir: str) -> str:
    if not os.path.isdir(run_dir):
        raise LingConfigError(f"RUN_DIR: {run_dir} does not exist; pass a training run directory "
                              f"(with bubbles/) or its bubbles/ folder")
    sub = os.path.join(run_dir, "bubbles")
    if glob.glob(os.path.join(sub, "rank*.json")):
        return sub
    if glob.glob(os.path.join(run_dir, "rank*.json")):
        return run_dir
    raise LingConfigError(f"RUN_DIR: no bubble profiles (bubbles/rank*.json) in {run_dir}; run ling-train "
                          f"with profiling.enabled=true (and profiling.steps) first")


def load_run(run_dir: str) -> Run:
    """Merge the per-rank JSON files of a run into one timeline per recorded iteration."""
    d = _find_dir(run_dir)
    docs = []
    for p in sorted(glob.glob(os.path.join(d, "rank*.json"))):
        try:
            with open(p) as f:
                doc = json.load(f)
        except json.JSONDecodeError as e:
            raise LingConfigError(f"RUN_DIR: {p} is not valid JSON ({e}); was the run killed while writing?") from None
        if doc.get("format") != FORMAT:
            raise LingConfigError(f"RUN_DIR: {p} is not a megatron-ling bubble profile")
        docs.append(doc)
    # keep one model replica: the pipeline ranks sharing the first file's tp/dp coordinates
    ref = docs[0]
    docs = [x for x in docs if x.get("tp_rank", 0) == ref.get("tp_rank", 0) and x.get("dp_rank", 0) == ref.get("dp_rank", 0)]
    pp, vpp = ref["pp"], ref["vpp"]
    by_pp = {x["pp_rank"]: x for x in docs}
    missing = [r for r in range(pp) if r not in by_pp]
    if missing:
        raise LingConfigError(f"RUN_DIR: profiles of pipeline ranks {missing} are missing in {d}; "
                              f"every pp rank of one replica must write (profiling.all_ranks or the default)")
    same_host = len({x["host"] for x in by_pp.values()}) == 1 and ref.get("clock") == "perf_counter"
    iters = [s["iteration"] for s in by_pp[0]["steps"]]
    timelines = []
    for it in iters:
        ranks = []
        for r in range(pp):
            steps = {s["iteration"]: s for s in by_pp[r]["steps"]}
            if it not in steps:
                raise LingConfigError(f"RUN_DIR: pp rank {r} has no record of iteration {it}")
            s = steps[it]
            off = s["t0_abs"] if same_host else 0.0
            ranks.append(sorted((Ev(e[0], e[1], e[2], e[3] + off, e[4] + off, e[5] if len(e) > 5 else "")
                                 for e in s["events"]), key=lambda e: e.start))
        timelines.append(Timeline._finish(pp, vpp, ranks, iteration=it))
    return Run(run_dir=d, pp=pp, vpp=vpp, meta=ref.get("meta", {}), timelines=timelines, clock=ref.get("clock"),
               alignment="shared monotonic clock" if same_host else "barrier at step start")


def mean_bubbles(run: Run, fwd_s=None, bwd_s=None) -> tuple[list[float], list[float]]:
    """Per rank: measured bubble fraction and simulated prediction, each averaged over the
    recorded iterations (the prediction of each iteration uses its own measured p2p hand-off and
    overhead, and either the given per-stage times or that iteration's own)."""
    meas = [0.0] * run.pp
    pred = [0.0] * run.pp
    for tl in run.timelines:
        p = tl.predict(fwd_s=fwd_s, bwd_s=bwd_s)["bubbles"]
        for r in range(run.pp):
            meas[r] += tl.bubbles[r] / len(run.timelines)
            pred[r] += p[r] / len(run.timelines)
    return meas, pred
