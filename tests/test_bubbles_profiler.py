"""Real multi-rank (gloo, CPU) runs under the bubble profiler: the recorder sees megatron-core's
actual schedule, the simulator predicts the measured bubbles, the planner's layout is measured
faster than the uniform split and close to the best of all layouts, and ling-bubbles writes a
valid Chrome trace and a PNG.

The model is deliberately unbalanced: a dense first layer, MoE layers, an MTP layer and a large
output layer + loss (MTP adds a second one), so the stage holding 'mL' dominates.
All runs happen once per module (fixture); margins observed are printed (pytest -s)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_ling.models.config import get_preset
from megatron_ling.pipeline.profile import load_run
from megatron_ling.pipeline.costmodel import Calibration, CostModel, CostOptions
from megatron_ling.pipeline.planner import all_layouts, counts_to_layout, even_counts, plan
from megatron_ling.pipeline.simulator import rank_program

# slow: hard timeouts (run_local(timeout_s=...), subprocess(timeout=...)); quiet: measured bubbles are compared
# with the simulator, so nothing else may load the machine (tools/test_all.sh runs these alone)
pytestmark = [pytest.mark.slow, pytest.mark.quiet]

SEQ, MBS = 64, 2
CFG = get_preset("ling-tiny", vocab_size=8192, hidden_size=128, intermediate_size=512, moe_intermediate_size=128,
                 num_hidden_layers=6)
M2, M4 = 4, 8  # micro batches for the PP=2 and PP=4 runs
TOL = 0.10


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megatron_ling.profiling.driver import measure_layouts

    d = tmp_path_factory.mktemp("bubbles")
    # unit calibration through the CLI (its own process, like a user would run it)
    sets = [f"{k}={getattr(CFG, k)}" for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                "moe_intermediate_size", "num_hidden_layers")]
    p = subprocess.run([sys.executable, "-m", "megatron_ling.profiling.plan_cli", "calibrate", "--preset", "ling-tiny",
                        "--set", *sets, "--seq-length", str(SEQ), "--mbs", str(MBS), "--reps", "7",
                        "--out", str(d / "cal.json")], capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    assert all(f"{k}: fwd" in p.stdout for k in ("E", "D", "M", "MTP_T", "MTP_L", "L"))
    cal = Calibration.load(str(d / "cal.json"))
    opts = CostOptions(seq_length=SEQ, micro_batch_size=MBS)
    plan2 = plan(CFG, 2, 1, M2, opts, calibration=cal)
    plan4 = plan(CFG, 4, 1, M4, opts, calibration=cal)
    every2 = [counts_to_layout(c, 1) for c in all_layouts(CFG, 2)]
    inter = "Ett|tt|t|tmL"  # PP=2 VPP=2
    r2 = measure_layouts(CFG, 2, every2 + [inter], SEQ, MBS, M2, str(d / "pp2"), steps=4, timeout_s=400)
    uni4 = counts_to_layout(even_counts(CFG.num_hidden_layers, 4), 1)
    lay4 = [uni4] + ([plan4.best.layout] if plan4.best.layout != uni4 else [])
    r4 = measure_layouts(CFG, 4, lay4, SEQ, MBS, M4, str(d / "pp4"), steps=4, timeout_s=400)
    return dict(dir=d, cal=cal, plan2=plan2, plan4=plan4, pp2={r["layout"]: r for r in r2[:-1]},
                inter=r2[-1], pp4={r["layout"]: r for r in r4}, uni4=uni4)


def _op_sequence(tl, rank):
    return [(e.kind, e.chunk, e.mb) for e in tl.ranks[rank] if e.kind in "FB"]


def test_recorded_order_is_megatrons_schedule(runs):
    """The simulator's per-rank program is the order megatron-core really ran (1F1B at PP=2 and
    PP=4, interleaved at PP=2 VPP=2)."""
    cases = [(r["run_dir"], 2, M2) for r in list(runs["pp2"].values())[:1]]
    cases += [(runs["inter"]["run_dir"], 2, M2), (runs["pp4"][runs["uni4"]]["run_dir"], 4, M4)]
    for run_dir, pp, m in cases:
        run = load_run(run_dir)
        for tl in run.timelines:
            assert tl.pp == pp and tl.num_microbatches == m
            for r in range(pp):
                want = [(k, a, b) for k, a, b in rank_program(r, pp, run.vpp, m) if k in "FB"]
                assert _op_sequence(tl, r) == want, (run_dir, r)


def _agreement(run, fwd_s=None, bwd_s=None):
    """Per recorded iteration, the worst |measured - simulated| bubble fraction over the ranks;
    returns the median over the iterations (one iteration disturbed by another process on a shared
    2-core machine is an outlier, not a verdict on the simulator) and the per-rank means printed."""
    import statistics

    from megatron_ling.pipeline.simulator import mean_bubbles, predict

    errs = []
    for tl in run.timelines:
        p = predict(tl, fwd_s=fwd_s, bwd_s=bwd_s)["bubbles"]
        errs.append(max(abs(a - b) for a, b in zip(tl.bubbles, p)))
    measured, simulated = mean_bubbles(run, fwd_s=fwd_s, bwd_s=bwd_s)
    return statistics.median(errs), measured, simulated


@pytest.mark.parametrize("which", ["pp2", "pp4", "inter"])
def test_measured_bubbles_match_simulator(runs, which):
    """Per rank, the measured bubble fraction is within +-0.10 of the simulator's prediction
    calibrated on this machine from the same run (per-stage times, measured p2p hand-off and
    per-op overhead), judged per iteration and taking the median iteration. A layout out of
    tolerance is measured again (6 steps, up to 2 rounds) and judged on its best round: a
    simulator that is wrong stays wrong in every round, a disturbed round does not. The prediction
    from the unit calibration (ling-plan calibrate) is printed beside it."""
    from megatron_ling.parallel.layout import expand
    from megatron_ling.profiling.driver import measure_layouts

    cm = CostModel(CFG, CostOptions(seq_length=SEQ, micro_batch_size=MBS), calibration=runs["cal"])
    items = {"pp2": list(runs["pp2"].values()), "pp4": list(runs["pp4"].values()), "inter": [runs["inter"]]}[which]
    pp, m = (4, M4) if which == "pp4" else (2, M2)
    err, err_unit = {}, {}
    for rnd in range(3):
        for r in items:
            run = load_run(r["run_dir"])
            lay = run.meta["layout"]
            e, measured, own = _agreement(run)
            st = cm.stage_costs(expand(lay))
            eu, _, unit = _agreement(run, fwd_s=[s["fwd_s"] for s in st], bwd_s=[s["bwd_s"] for s in st])
            err[lay] = min(err.get(lay, e), e)
            err_unit[lay] = min(err_unit.get(lay, eu), eu)
            print(f"\n[{which}{' again' * (rnd > 0)}] {lay}: measured {[round(x, 3) for x in measured]} simulated "
                  f"{[round(x, 3) for x in own]} (unit-calibrated {[round(x, 3) for x in unit]}); "
                  f"median-iteration error {e:.3f}")
        bad = sorted(k for k, v in err.items() if v > TOL)
        if not bad or rnd == 2:
            break
        items = measure_layouts(CFG, pp, bad, SEQ, MBS, m, str(runs["dir"] / f"{which}_again{rnd}"),
                                steps=6, timeout_s=400)
    worst = max(err.values())
    print(f"[{which}] worst |measured - simulated| {worst:.3f} (unit-calibrated {max(err_unit.values()):.3f})")
    assert worst <= TOL, {k: round(v, 3) for k, v in err.items()}


def test_planner_beats_uniform_and_is_near_best(runs):
    """PP=2 (one core per rank on a 2-core CI machine): the planned layout (unit-calibrated cost
    model) is measured faster than the uniform split and within 10% of the fastest of all 7 valid
    layouts. Measured = fastest of the recorded iterations (the least disturbed one), layouts
    stepped round-robin. If load from other jobs blurs the measurement (two busy ranks on a loaded
    2-core machine barely run in parallel, which erases the differences between layouts), the
    three layouts concerned are measured again (6 steps, up to 3 rounds, keeping each one's
    fastest iteration) before judging.

    PP=4 is printed, not judged: 4 ranks on 2 cores cannot run their stages in parallel, so every
    layout costs about the same total CPU time there."""
    from megatron_ling.profiling.driver import measure_layouts

    pp2 = runs["pp2"]
    planned, uniform = runs["plan2"].best.layout, runs["plan2"].uniform.layout
    t = {k: v["iteration_s"] for k, v in pp2.items()}
    best = min(t, key=t.get)
    print("\nPP=2 measured ms: " + ", ".join(f"{k}: {v * 1e3:.1f}" for k, v in t.items()))
    for attempt in range(3):
        if t[planned] < t[uniform] and t[planned] <= 1.10 * t[best]:
            break
        again = measure_layouts(CFG, 2, sorted({planned, uniform, best}), SEQ, MBS, M2,
                                str(runs["dir"] / f"pp2_again{attempt}"), steps=6, timeout_s=300)
        for r in again:
            t[r["layout"]] = min(t[r["layout"]], r["iteration_s"])
        print("re-measured: " + ", ".join(f"{r['layout']}: {r['iteration_s'] * 1e3:.1f}" for r in again))
        best = min(t, key=t.get)
    print(f"PP=2 planned {planned} {t[planned] * 1e3:.1f} ms, uniform {uniform} {t[uniform] * 1e3:.1f} ms "
          f"({1 - t[planned] / t[uniform]:.1%} faster), best measured {best} {t[best] * 1e3:.1f} ms "
          f"(planned {t[planned] / t[best] - 1:+.1%}); simulated gain {runs['plan2'].gain:.1%}")
    assert t[planned] < t[uniform]
    assert t[planned] <= 1.10 * t[best]
    pp4 = runs["pp4"]
    planned4, uni4 = runs["plan4"].best.layout, runs["uni4"]
    print(f"PP=4 (2 cores, not judged) planned {planned4} {pp4[planned4]['iteration_s'] * 1e3:.1f} ms vs uniform "
          f"{uni4} {pp4[uni4]['iteration_s'] * 1e3:.1f} ms; simulated gain {runs['plan4'].gain:.1%}")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "megatron_ling.profiling.bubbles_cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_report_trace_png_and_table(runs):
    run_dir = runs["pp4"][runs["uni4"]]["run_dir"]
    out = os.path.join(os.path.dirname(run_dir), "report_uni")
    p = _cli("report", run_dir, "--out", out)
    assert p.returncode == 0, p.stderr
    for r in range(4):
        assert f"\n   {r} " in p.stdout
    assert "critical path" in p.stdout and "sim bubble" in p.stdout
    with open(os.path.join(out, "trace.json")) as f:
        trace = json.load(f)
    evs = trace["traceEvents"]
    xs = [e for e in evs if e["ph"] == "X"]
    assert xs and all(isinstance(e["ts"], (int, float)) and e["dur"] >= 0 and isinstance(e["pid"], int)
                      and isinstance(e["tid"], int) and isinstance(e["name"], str) for e in xs)
    assert {e["pid"] for e in xs} == {0, 1}  # measured and simulated
    assert sum(1 for e in xs if e["pid"] == 0 and e["cat"] == "F") == 4 * M4
    assert all(e["ph"] in ("X", "M") for e in evs)
    with open(os.path.join(out, "timeline.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # never overwrite without --force
    p = _cli("report", run_dir, "--out", out)
    assert p.returncode == 2 and p.stderr.startswith("error: --out") and len(p.stderr.strip().splitlines()) == 1
    # calibrated-from-units prediction
    p = _cli("report", run_dir, "--out", out, "--force", "--no-png", "--calibration",
             str(runs["dir"] / "cal.json"))
    assert p.returncode == 0, p.stderr
    assert "unit costs from" in p.stdout


def test_report_unknown_run_dir(tmp_path):
    p = _cli("report", str(tmp_path / "nope"))
    assert p.returncode == 2
    assert p.stderr.startswith("error: RUN_DIR:") and len(p.stderr.strip().splitlines()) == 1
    p = _cli("report", str(tmp_path))
    assert p.returncode == 2 and "no bubble profiles" in p.stderr
