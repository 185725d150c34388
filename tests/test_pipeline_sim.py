"""Schedule simulator: analytic bubbles for equal stages, megatron-core's own warm-up counts and
schedule table, p2p latency, memory accounting, bad inputs."""
from __future__ import annotations

import pytest

from megatron_ling.errors import LingConfigError
from megatron_ling.pipeline.simulator import (analytic_bubble, peak_inflight, rank_program, schedule_table,
                                               simulate)


@pytest.mark.parametrize("pp,m", [(2, 1), (2, 4), (4, 4), (4, 8), (3, 7), (8, 16), (8, 3)])
def test_1f1b_equal_stages_match_analytic(pp, m):
    f, b = 1.0, 2.0
    res = simulate([f] * pp, [b] * pp, pp, m)
    assert res.iteration_s == pytest.approx((m + pp - 1) * (f + b))
    for bub in res.bubbles:
        assert bub == pytest.approx(analytic_bubble(pp, m), abs=1e-12)


@pytest.mark.parametrize("pp,v,m", [(2, 2, 4), (2, 2, 6), (4, 2, 8), (4, 2, 16), (4, 4, 8), (3, 2, 6), (4, 2, 12),
                                    (8, 2, 16), (4, 3, 8)])
def test_interleaved_equal_stages_match_analytic(pp, v, m):
    f, b = 1.0 / v, 2.0 / v  # a rank's model split into v chunks
    res = simulate([f] * (pp * v), [b] * (pp * v), pp, m)
    for bub in res.bubbles:
        assert bub == pytest.approx(analytic_bubble(pp, m, v), abs=1e-12)
    # and interleaving beats 1F1B by the analytic factor
    assert res.iteration_s == pytest.approx(m * 3.0 + (pp - 1) * 3.0 / v)


class _Group:
    def __init__(self, size, rank):
        self._s, self._r = size, rank

    def size(self):
        return self._s

    def rank(self):
        return self._r


class _Comm:
    def __init__(self, pp, rank, vpp):
        self.pp_group = _Group(pp, rank)
        self.virtual_pipeline_model_parallel_size = vpp


@pytest.mark.parametrize("pp,v,m", [(2, 1, 4), (4, 1, 8), (4, 1, 2), (2, 2, 4), (4, 2, 8), (4, 2, 4), (4, 3, 12)])
def test_warmup_counts_and_table_are_megatrons(pp, v, m):
    """Forwards before a rank's first backward = megatron-core's num_warmup_microbatches (+1 for
    the first steady-state forward), and the interleaved order follows its schedule table."""
    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches, get_schedule_table

    if v > 1:
        assert schedule_table(m, v, pp) == get_schedule_table(m, v, pp)
    for r in range(pp):
        total, all_warm, warm, rem = get_pp_rank_microbatches(m, v, pp, p2p_communicator=_Comm(pp, r, v if v > 1 else None))
        prog = [op for op in rank_program(r, pp, v, m) if op[0] in "FB"]
        first_b = next(i for i, op in enumerate(prog) if op[0] == "B")
        assert first_b == (warm + 1 if rem else warm)
        assert sum(op[0] == "F" for op in prog) == sum(op[0] == "B" for op in prog) == total
        if v > 1:
            table = get_schedule_table(m, v, pp)
            fwd = [(op[1], op[2]) for op in prog if op[0] == "F"]
            assert fwd == [(c, mb) for mb, c in table]
            bwd = [(op[1], op[2]) for op in prog if op[0] == "B"]
            assert bwd == [(v - 1 - c, mb) for mb, c in table]


def test_p2p_latency():
    # PP=2, m=2, worked by hand: F0 | F0' B0' | B0 needs the grad 2 hops later ... = 9 + 2*lat
    lat = 0.1
    assert simulate([1.0, 1.0], [2.0, 2.0], 2, 2, p2p_latency_s=lat).iteration_s == pytest.approx(9.0 + 2 * lat)
    # longer pipelines: at least the fill and drain hops; in 1F1B's lock-stepped steady state equal
    # stages have no slack, so every round trip on the critical path adds too
    pp, m = 4, 8
    base = simulate([1.0] * pp, [2.0] * pp, pp, m).iteration_s
    slow = simulate([1.0] * pp, [2.0] * pp, pp, m, p2p_latency_s=lat).iteration_s
    assert slow >= base + 2 * (pp - 1) * lat - 1e-9
    assert slow <= base + 2 * (pp - 1 + m) * lat + 1e-9


def test_unbalanced_last_stage_dominates():
    """A heavy last stage sets the steady-state pace: iteration = fill + m * (last stage)."""
    pp, m = 4, 16
    f = [1.0, 1.0, 1.0, 3.0]
    b = [2.0, 2.0, 2.0, 6.0]
    res = simulate(f, b, pp, m)
    assert res.iteration_s == pytest.approx(sum(f[:-1]) + m * 9.0 + sum(b[:-1]))
    assert res.bubbles[-1] == pytest.approx(1 - m * 9.0 / res.iteration_s)
    assert res.bubbles[0] > 0.6


def test_peak_inflight_is_1f1b_memory_bound():
    pp, m = 4, 8
    for r in range(pp):
        assert peak_inflight(r, pp, 1, m) == [min(m, pp - r)]
    # interleaving holds more micro batches on the first rank
    assert sum(peak_inflight(0, pp, 2, m)) > pp


def test_simulator_bad_inputs():
    with pytest.raises(LingConfigError, match="pp\\*vpp"):
        simulate([1.0] * 3, [1.0] * 3, 2, 4)
    with pytest.raises(LingConfigError, match="micro-batches"):
        simulate([1.0] * 8, [1.0] * 8, 4, 2)  # interleaved needs m >= pp
    with pytest.raises(LingConfigError, match="multiple"):
        simulate([1.0] * 8, [1.0] * 8, 4, 6)  # last group of 2 < pp


def test_timeline_analysis_of_simulated_run():
    """Bubble breakdown and critical path on a simulated timeline: warm-up + steady + cool-down =
    idle; the critical path of an equal-stage 1F1B pipeline has no slack."""
    pp, m = 4, 8
    res = simulate([1.0] * pp, [2.0] * pp, pp, m)
    tl = res.to_timeline()
    for s, bub in zip(tl.rank_stats(), res.bubbles):
        assert s.bubble == pytest.approx(bub)
        assert s.warmup_idle_s + s.steady_idle_s + s.cooldown_idle_s == pytest.approx(s.idle_s)
        assert s.steady_idle_s == pytest.approx(0.0, abs=1e-9)
    # rank 0 waits (p-1)*b for its first gradient and idles (p-1)*f at the end; the last rank
    # the other way round
    st = tl.rank_stats()
    assert (st[0].warmup_idle_s, st[0].cooldown_idle_s) == (pytest.approx(6.0), pytest.approx(3.0))
    assert (st[-1].warmup_idle_s, st[-1].cooldown_idle_s) == (pytest.approx(3.0), pytest.approx(6.0))
    cp = tl.critical_path_summary()
    assert cp["compute_s"] == pytest.approx(res.iteration_s)
