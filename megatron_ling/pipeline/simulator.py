"""Event simulation of megatron-core 0.16.1's pipeline schedules.

The simulator replays, per pipeline rank, the exact sequence of compute steps and blocking p2p
calls that ``megatron.core.pipeline_parallel.schedules`` issues (default config:
``overlap_p2p_comm=False``, training, no ``forward_only``):

* ``forward_backward_pipelining_without_interleaving`` (1F1B): ``p - r - 1`` warm-up forwards,
  the steady ``F; send_forward_recv_backward; B; send_backward_recv_forward`` loop, cool-down
  backwards.
* ``forward_backward_pipelining_with_interleaving``: the microbatch schedule table grouped by
  ``microbatch_group_size_per_vp_stage`` (default p), ``(p - r - 1) * 2 + (v - 1) * G`` warm-up
  steps, the steady loop that runs one forward and one backward and *then* one combined
  ``send_forward_backward_recv_forward_backward`` (so a steady-state forward output leaves the rank
  only after the backward that follows it), ``recv_tensor_from_previous_stage``'s rule for which
  receives are posted, and the cool-down.

Messages travel on two FIFO channels per rank pair (forward: r -> r+1, wrapping p-1 -> 0 for
interleaving; backward: r -> r-1), as torch.distributed p2p does; a receive blocks its rank until
the matching send has happened plus the p2p latency, sends do not block. The result is a per-rank
timeline of forward/backward/p2p-wait intervals, the iteration time and per-rank bubble fractions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional, Sequence

from megatron_ling.errors import LingConfigError
from megatron_ling.pipeline.timeline import Event, Timeline

FWD, BWD = "fwd", "bwd"  # channel names


# ----------------------------------------------------------------------------- programs
def schedule_table(num_microbatches: int, num_chunks: int, group: int) -> list[tuple[int, int]]:
    """megatron-core ``get_schedule_table``: (microbatch_id, model_chunk_id) per virtual step."""
    table = []
    for lo in range(0, num_microbatches, group):
        hi = num_microbatches if lo + group >= num_microbatches else lo + group
        table += [(mb, c) for c in range(num_chunks) for mb in range(lo, hi)]
    return table


def check_schedule(pp: int, vpp: int, m: int, group: Optional[int] = None) -> int:
    """The checks megatron-core makes before scheduling; returns the microbatch group size."""
    if pp < 1 or vpp < 1 or m < 1:
        raise LingConfigError(f"schedule: pp, vpp and micro-batches must be >= 1 (got pp={pp} vpp={vpp} m={m})")
    if vpp == 1:
        return m
    g = pp if group is None else group
    if g > m or g < pp:
        raise LingConfigError(f"training.micro_batches: interleaved 1F1B needs pp={pp} <= microbatch group "
                              f"size {g} <= micro-batches {m}; use at least {pp} micro-batches")
    rem = m % g
    if 0 < rem < pp:
        raise LingConfigError(f"training.micro_batches: {m} micro-batches leave a last group of {rem} < pp={pp} "
                              f"(megatron-core refuses this); use a multiple of {g}")
    return g


# An op is (kind, a, b): ("F", chunk, mb), ("B", chunk, mb) or
# ("C", sends, recvs) with sends/recvs tuples of channel names.
@lru_cache(maxsize=64)
def rank_program(rank: int, pp: int, vpp: int, m: int, group: Optional[int] = None) -> tuple:
    g = check_schedule(pp, vpp, m, group)
    first, last = rank == 0, rank == pp - 1
    ops: list = []

    def comm(send_f=False, send_b=False, recv_f=False, recv_b=False):
        sends = tuple(c for c, on in ((FWD, send_f), (BWD, send_b)) if on)
        recvs = tuple(c for c, on in ((FWD, recv_f), (BWD, recv_b)) if on)
        if sends or recvs:
            ops.append(("C", sends, recvs))

    if vpp == 1:
        w = min(pp - rank - 1, m)
        r = m - w
        for i in range(w):
            comm(recv_f=not first)
            ops.append(("F", 0, i))
            comm(send_f=not last)
        if r > 0:
            comm(recv_f=not first)
        for i in range(r):
            ops.append(("F", 0, w + i))
            comm(send_f=not last, recv_b=not last)
            ops.append(("B", 0, i))
            if i == r - 1:
                comm(send_b=not first)
            else:
                comm(send_b=not first, recv_f=not first)
        for i in range(w):
            comm(recv_b=not last)
            ops.append(("B", 0, r + i))
            comm(send_b=not first)
        return tuple(ops)

    table = schedule_table(m, vpp, g)
    total = m * vpp
    w = (pp - rank - 1) * 2 + (vpp - 1) * g
    all_warmup = w >= total
    w = min(w, total)
    rem = total - w

    def chunk(k, forward):
        c = table[k % total][1]
        return c if forward else vpp - 1 - c

    def mb(k):
        return table[k % total][0]

    def recv_from_prev(k, forward):  # megatron-core recv_tensor_from_previous_stage
        leading = first if forward else last
        if not leading:
            return True
        last_chunk = vpp - 1 if forward else 0
        nxt = chunk(k + 1, forward) if k < pp - 1 else chunk(k - (pp - 1), forward)
        return not (k < pp - 1 or nxt == last_chunk)

    comm(recv_f=not first)
    for k in range(w):
        c = chunk(k, True)
        ops.append(("F", c, mb(k)))
        recv_prev = recv_from_prev(k, True) and k != total - 1
        send_out = not (c == vpp - 1 and last)
        if k == w - 1 and not all_warmup:
            comm(send_f=send_out, recv_f=recv_prev, recv_b=not last)
        else:
            comm(send_f=send_out, recv_f=recv_prev)
    for k in range(rem):
        fk = k + w
        cf, cb = chunk(fk, True), chunk(k, False)
        ops.append(("F", cf, mb(fk)))
        ops.append(("B", cb, mb(k)))
        recv_prev = recv_from_prev(fk, True) and k != rem - 1
        recv_next = recv_from_prev(k, False)
        comm(send_f=not (cf == vpp - 1 and last), send_b=not (cb == 0 and first),
             recv_f=recv_prev, recv_b=recv_next)
    if all_warmup:
        comm(recv_b=not last)
    for k in range(rem, total):
        cb = chunk(k, False)
        ops.append(("B", cb, mb(k)))
        recv_next = recv_from_prev(k, False) and k != total - 1
        comm(send_b=not (cb == 0 and first), recv_b=recv_next)
    return tuple(ops)


# --------------------------------------------------------------------------- simulation
@dataclass
class SimResult:
    pp: int
    vpp: int
    num_microbatches: int
    events: list = field(default_factory=list)  # list[list[Event]] per rank
    iteration_s: float = 0.0

    def busy(self, rank: int) -> float:
        return sum(e.end - e.start for e in self.events[rank] if e.kind in "FB")

    def bubble(self, rank: int) -> float:
        return 1.0 - self.busy(rank) / self.iteration_s if self.iteration_s > 0 else 0.0

    @property
    def bubbles(self) -> list[float]:
        return [self.bubble(r) for r in range(self.pp)]

    @property
    def mean_bubble(self) -> float:
        return sum(self.bubbles) / self.pp

    def to_timeline(self) -> Timeline:
        return Timeline.from_events(self.pp, self.vpp, self.events, t_end=self.iteration_s)


def simulate(fwd_s: Sequence[float], bwd_s: Sequence[float], pp: int, num_microbatches: int,
             p2p_latency_s: float = 0.0, group: Optional[int] = None, record: bool = True) -> SimResult:
    """Simulate one training iteration.

    ``fwd_s[i]``/``bwd_s[i]`` are the times of schedule stage i (layout order: stage i lives on
    pp rank ``i % pp``, model chunk ``i // pp``); ``len(fwd_s) = pp * vpp``.
    """
    n = len(fwd_s)
    if n != len(bwd_s) or n % pp or n == 0:
        raise LingConfigError(f"simulate: {n} forward and {len(bwd_s)} backward stage times for pp={pp}; "
                              f"give pp*vpp of each")
    vpp = n // pp
    m = num_microbatches
    progs = [rank_program(r, pp, vpp, m, group) for r in range(pp)]
    # channel (kind, dst) -> list of arrival times; reads consume in order (FIFO)
    arrivals: dict = {}
    reads: dict = {}
    pc = [0] * pp
    posted = [-1] * pp
    now = [0.0] * pp
    events: list = [[] for _ in range(pp)]
    done = 0
    nops = sum(len(p) for p in progs)
    while done < nops:
        progress = False
        for r in range(pp):
            prog, ev = progs[r], events[r]
            while pc[r] < len(prog):
                kind, a, b = prog[pc[r]]
                t = now[r]
                if kind == "C":
                    if posted[r] != pc[r]:  # isend/irecv are posted before any wait
                        posted[r] = pc[r]
                        for ch in a:
                            dst = (r + 1) % pp if ch == FWD else (r - 1) % pp
                            arrivals.setdefault((ch, dst), []).append(t + p2p_latency_s)
                    ready = t
                    ok = True
                    for ch in b:
                        key = (ch, r)
                        i = reads.get(key, 0)
                        q = arrivals.get(key)
                        if q is None or len(q) <= i:
                            ok = False
                            break
                        if q[i] > ready:
                            ready = q[i]
                    if not ok:
                        break
                    for ch in b:
                        reads[(ch, r)] = reads.get((ch, r), 0) + 1
                    if record and ready > t:
                        ev.append(Event("W", -1, -1, t, ready))
                    now[r] = ready
                else:
                    s = a * pp + r
                    d = fwd_s[s] if kind == "F" else bwd_s[s]
                    if record:
                        ev.append(Event(kind, a, b, t, t + d))
                    now[r] = t + d
                pc[r] += 1
                done += 1
                progress = True
        if not progress:
            stuck = {r: progs[r][pc[r]] for r in range(pp) if pc[r] < len(progs[r])}
            raise RuntimeError(f"schedule deadlock in simulation (pp={pp} vpp={vpp} m={m}): {stuck}")
    res = SimResult(pp=pp, vpp=vpp, num_microbatches=m, events=events, iteration_s=max(now))
    return res


def iteration_time(fwd_s, bwd_s, pp, num_microbatches, p2p_latency_s=0.0, group=None) -> float:
    """Iteration time only (no event recording): the planner's objective."""
    return simulate(fwd_s, bwd_s, pp, num_microbatches, p2p_latency_s, group, record=False).iteration_s


def analytic_bubble(pp: int, num_microbatches: int, vpp: int = 1) -> float:
    """Bubble fraction of equal stages with no p2p cost: (p-1)/(v*m + p-1)."""
    return (pp - 1) / (vpp * num_microbatches + pp - 1)


def peak_inflight(rank: int, pp: int, vpp: int, m: int, group: Optional[int] = None) -> list[int]:
    """Per model chunk, the most micro batches whose activations a rank holds at once."""
    cur, peak = [0] * vpp, [0] * vpp
    for kind, a, _ in rank_program(rank, pp, vpp, m, group):
        if kind == "F":
            cur[a] += 1
            peak[a] = max(peak[a], cur[a])
        elif kind == "B":
            cur[a] -= 1
    return peak


def peak_activation_bytes(rank: int, pp: int, vpp: int, m: int, act_bytes: Sequence[float],
                          group: Optional[int] = None) -> float:
    """Peak activation memory of one rank, following its real F/B order.
    ``act_bytes[i]`` is the per-micro-batch activation memory of schedule stage i."""
    cur = peak = 0.0
    for kind, a, _ in rank_program(rank, pp, vpp, m, group):
        if kind == "F":
            cur += act_bytes[a * pp + rank]
            peak = max(peak, cur)
        elif kind == "B":
            cur -= act_bytes[a * pp + rank]
    return peak


# ------------------------------------------------------------ prediction of a measured timeline
def predict(tl: Timeline, fwd_s=None, bwd_s=None, latency_s=None, overhead_s=None) -> dict:
    """Simulated iteration and per-rank bubbles for timeline ``tl``, from the given per-stage
    times or, by default, the times measured in ``tl``."""
    mf, mb_ = tl.stage_times()
    f = list(fwd_s if fwd_s is not None else mf)
    b = list(bwd_s if bwd_s is not None else mb_)
    lat = tl.handoff_latency() if latency_s is None else latency_s
    ovh = tl.op_overhead() if overhead_s is None else overhead_s
    m = tl.num_microbatches
    # overheads are part of each op's occupancy of its rank, but not compute
    res = simulate([x + ovh for x in f], [x + ovh for x in b], tl.pp, m, lat)
    busy = [m * sum(f[v * tl.pp + r] + b[v * tl.pp + r] for v in range(tl.vpp)) for r in range(tl.pp)]
    it = res.iteration_s
    return {"iteration_s": it, "bubbles": [1.0 - x / it for x in busy], "latency_s": lat, "overhead_s": ovh,
            "fwd_s": f, "bwd_s": b, "sim": res}


def mean_bubbles(run, fwd_s=None, bwd_s=None) -> tuple[list[float], list[float]]:
    """Per rank of a profiled run (``profile.Run``): measured bubble fraction and simulated
    prediction, each averaged over the recorded iterations (the prediction of each iteration uses its own measured p2p hand-off and
    overhead, and either the given per-stage times or that iteration's own)."""
    meas = [0.0] * run.pp
    pred = [0.0] * run.pp
    for tl in run.timelines:
        p = predict(tl, fwd_s=fwd_s, bwd_s=bwd_s)["bubbles"]
        for r in range(run.pp):
            meas[r] += tl.bubbles[r] / len(run.timelines)
            pred[r] += p[r] / len(run.timelines)
    return meas, pred
