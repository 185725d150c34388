"""The one timeline/event type of the pipeline package, shared by measured runs (profile files)
and the simulator.

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
* what a simulator prediction is calibrated from (``stage_times``, ``handoff_latency``,
  ``op_overhead``; the prediction itself is ``simulator.predict``).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Optional

from megatron_ling.errors import LingConfigError


@dataclass
class Event:
    """One interval on one pipeline rank: a forward (F) or backward (B) of micro batch ``mb`` on
    model chunk ``chunk`` (schedule stage ``chunk * pp + rank``), or a p2p wait (W, chunk = mb = -1)."""

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
    ranks: list  # list[list[Event]] per pp rank, sorted by start
    t_start: float = 0.0
    t_end: float = 0.0
    iteration: Optional[int] = None

    @classmethod
    def from_events(cls, pp, vpp, events, t_end=None, iteration=None) -> "Timeline":
        ranks = []
        for evs in events:
            ranks.append(sorted((Event(e.kind, e.chunk, e.mb, e.start, e.end) for e in evs), key=lambda e: e.start))
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

    def critical_path(self) -> list[tuple[int, Event]]:
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
