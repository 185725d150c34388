"""``ling-bubbles report``: table, Chrome/Perfetto trace and PNG timeline of a profiled run,
with the simulator's prediction beside the measurement."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

from megatron_ling.errors import LingConfigError
from megatron_ling.pipeline.profile import Run, load_run
from megatron_ling.pipeline.simulator import predict
from megatron_ling.pipeline.timeline import Timeline


def _layout(run: Run) -> Optional[str]:
    """The run's layout string, as ling-train and ling-plan measure record it."""
    return run.meta.get("layout")


def _pick(run: Run, iteration: Optional[int]) -> Timeline:
    if iteration is None:
        return run.timelines[-1]
    for tl in run.timelines:
        if tl.iteration == iteration:
            return tl
    raise LingConfigError(f"--iteration: iteration {iteration} was not recorded; recorded: "
                          f"{[t.iteration for t in run.timelines]}")


def prediction(run: Run, tl: Timeline, calibration: Optional[str] = None) -> dict:
    """Simulator prediction. Default: calibrated from the measured run itself (median per-stage
    times). With a calibration file and the model/layout in the run's meta: from the cost model."""
    if calibration is None:
        p = predict(tl)
        p["source"] = "simulator, per-stage times calibrated from this run"
        return p
    from megatron_ling.models.config import LingConfig
    from megatron_ling.parallel.layout import expand
    from megatron_ling.pipeline.costmodel import Calibration, CostModel, CostOptions

    meta = dict(run.meta, layout=_layout(run))
    need = [k for k in ("ling", "layout", "seq_length", "micro_batch_size") if not meta.get(k)]
    if need:
        raise LingConfigError(f"--calibration: the run's profile lacks {need} in its meta; predict without "
                              f"--calibration (self-calibrated) instead")
    cm = CostModel(LingConfig.from_hf_dict(meta["ling"]),
                   CostOptions(seq_length=meta["seq_length"], micro_batch_size=meta["micro_batch_size"]),
                   calibration=Calibration.load(calibration))
    st = cm.stage_costs(expand(meta["layout"]))
    p = predict(tl, fwd_s=[s["fwd_s"] for s in st], bwd_s=[s["bwd_s"] for s in st])
    p["source"] = f"simulator, unit costs from {calibration}"
    return p


def table(run: Run, tl: Timeline, pred: dict) -> str:
    stats = tl.rank_stats()
    ms = 1e3
    lines = [f"run: {run.run_dir}   pp={run.pp} vpp={run.vpp} micro-batches={tl.num_microbatches} "
             f"iteration={tl.iteration}   clock={run.clock} ({run.alignment})"]
    if _layout(run):
        lines.append(f"layout: {_layout(run)}")
    lines.append(f"recorded iterations (pipeline span, ms): "
                 + ", ".join(f"{t.iteration}: {t.span * ms:.1f}" for t in run.timelines))
    lines.append("")
    hdr = (f"{'rank':>4} {'busy ms':>9} {'idle ms':>9} {'bubble':>7} {'warm-up':>8} {'steady':>8} "
           f"{'cool-down':>9} {'p2p wait':>9} {'sim bubble':>10} {'diff':>6}")
    lines += [hdr, "-" * len(hdr)]
    for s, pb in zip(stats, pred["bubbles"]):
        lines.append(f"{s.rank:>4} {s.busy_s * ms:>9.1f} {s.idle_s * ms:>9.1f} {s.bubble:>7.3f} "
                     f"{s.warmup_idle_s / tl.span:>8.3f} {s.steady_idle_s / tl.span:>8.3f} "
                     f"{s.cooldown_idle_s / tl.span:>9.3f} {s.p2p_wait_s * ms:>9.1f} {pb:>10.3f} {s.bubble - pb:>+6.3f}")
    mean = sum(s.bubble for s in stats) / len(stats)
    pmean = sum(pred["bubbles"]) / len(pred["bubbles"])
    lines.append(f"{'mean':>4} {'':>9} {'':>9} {mean:>7.3f} {'':>8} {'':>8} {'':>9} {'':>9} {pmean:>10.3f} {mean - pmean:>+6.3f}")
    lines.append("(warm-up / steady / cool-down: idle time before the rank's first backward, between, and after "
                 "its last forward, as fractions of the span)")
    lines.append("")
    lines.append(f"iteration (pipeline span): measured {tl.span * ms:.1f} ms, simulated {pred['iteration_s'] * ms:.1f} ms "
                 f"({pred['source']}; p2p hand-off {pred['latency_s'] * ms:.2f} ms, per-op overhead "
                 f"{pred['overhead_s'] * ms:.2f} ms)")
    cp = tl.critical_path_summary()
    per = ", ".join(f"rank {r}: {t * ms:.1f} ms" for r, t in cp["per_rank_s"].items())
    lines.append(f"critical path: {cp['events']} ops, compute {cp['compute_s'] * ms:.1f} ms + comm/overhead "
                 f"{cp['comm_or_overhead_s'] * ms:.1f} ms; compute by rank: {per}")
    lines.append("stage times (median ms, schedule order): "
                 + " ".join(f"{i}:{f * ms:.1f}/{b * ms:.1f}" for i, (f, b) in enumerate(zip(*tl.stage_times()))))
    return "\n".join(lines)


def chrome_trace(run: Run, tl: Timeline, pred: Optional[dict] = None) -> dict:
    """Chrome trace-event JSON (loads in Perfetto and chrome://tracing): pid 0 measured, pid 1
    simulated; one thread per pipeline rank; 'X' complete events in microseconds."""
    ev = [{"ph": "M", "name": "process_name", "pid": 0, "tid": 0, "args": {"name": "measured"}}]
    us = 1e6

    def add(pid, rank, e, t0):
        name = {"F": "forward", "B": "backward", "W": "p2p"}[e.kind]
        if e.kind != "W":
            name += f" mb{e.mb} c{e.chunk}"
        ev.append({"name": name, "cat": e.kind, "ph": "X", "pid": pid, "tid": rank,
                   "ts": round((e.start - t0) * us, 3), "dur": round(max(e.end - e.start, 0.0) * us, 3),
                   "args": {"microbatch": e.mb, "chunk": e.chunk, "stage": e.chunk * tl.pp + rank if e.chunk >= 0 else None}})

    for r, evs in enumerate(tl.ranks):
        ev.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": r, "args": {"name": f"pp rank {r}"}})
        for e in evs:
            add(0, r, e, tl.t_start)
    if pred is not None:
        sim = pred["sim"].to_timeline()
        ev.append({"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": "simulated"}})
        for r, evs in enumerate(sim.ranks):
            ev.append({"ph": "M", "name": "thread_name", "pid": 1, "tid": r, "args": {"name": f"pp rank {r}"}})
            for e in evs:
                add(1, r, e, sim.t_start)
    return {"traceEvents": ev, "displayTimeUnit": "ms",
            "otherData": {"pp": tl.pp, "vpp": tl.vpp, "iteration": tl.iteration, "run_dir": run.run_dir}}


def plot_png(tl: Timeline, path: str, pred: Optional[dict] = None, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = [("measured", tl, sum(tl.bubbles) / tl.pp)]
    if pred is not None:
        rows.append(("simulated", pred["sim"].to_timeline(), sum(pred["bubbles"]) / tl.pp))
    m = max(tl.num_microbatches, 1)
    cmap = plt.get_cmap("tab20" if m > 10 else "tab10")
    fig, axes = plt.subplots(len(rows), 1, figsize=(12, 1.0 + 0.45 * tl.pp * len(rows) + 0.6 * len(rows)),
                             squeeze=False)
    ms = 1e3
    for ax, (label, t, bub) in zip(axes[:, 0], rows):
        for r, evs in enumerate(t.ranks):
            for e in evs:
                x, w = (e.start - t.t_start) * ms, (e.end - e.start) * ms
                if e.kind == "W":
                    ax.broken_barh([(x, w)], (r - 0.12, 0.24), color="0.85")
                    continue
                c = cmap(e.mb % cmap.N)
                ax.broken_barh([(x, w)], (r - 0.4, 0.8), facecolor=c, edgecolor="black", linewidth=0.3,
                               hatch="//" if e.kind == "B" else None)
                if w > 0.02 * t.span * ms:
                    ax.text(x + w / 2, r, f"{e.mb}" + (f".{e.chunk}" if t.vpp > 1 else ""), ha="center",
                            va="center", fontsize=6)
        ax.set_yticks(range(t.pp))
        ax.set_yticklabels([f"rank {r}" for r in range(t.pp)])
        ax.invert_yaxis()
        ax.set_xlim(0, t.span * ms)
        ax.set_xlabel("ms")
        ax.set_title(f"{label}: iteration {t.span * ms:.1f} ms, mean bubble {bub:.3f}", fontsize=9)
    axes[0, 0].legend(handles=[Patch(facecolor="white", edgecolor="black", label="forward"),
                               Patch(facecolor="white", edgecolor="black", hatch="//", label="backward"),
                               Patch(facecolor="0.85", label="p2p")], loc="upper right", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_dir: str, out: Optional[str] = None, iteration: Optional[int] = None,
                 calibration: Optional[str] = None, force: bool = False, png: bool = True) -> dict:
    """Write report.txt, report.json, trace.json and timeline.png; returns paths and numbers."""
    run = load_run(run_dir)
    tl = _pick(run, iteration)
    out = out or os.path.join(run.run_dir, "report")
    if os.path.exists(out) and not force:
        raise LingConfigError(f"--out: {out} exists; pass --force to overwrite")
    pred = prediction(run, tl, calibration)
    text = table(run, tl, pred)
    stats = tl.rank_stats()
    numbers = {
        "iteration": tl.iteration, "pp": tl.pp, "vpp": tl.vpp, "num_microbatches": tl.num_microbatches,
        "span_s": tl.span, "bubbles": [s.bubble for s in stats],
        "warmup_s": [s.warmup_idle_s for s in stats], "steady_s": [s.steady_idle_s for s in stats],
        "cooldown_s": [s.cooldown_idle_s for s in stats], "busy_s": [s.busy_s for s in stats],
        "predicted": {"iteration_s": pred["iteration_s"], "bubbles": pred["bubbles"], "source": pred["source"],
                      "latency_s": pred["latency_s"], "overhead_s": pred["overhead_s"]},
        "critical_path": tl.critical_path_summary(), "meta": run.meta,
    }
    parent = os.path.dirname(os.path.abspath(out))
    tmp = tempfile.mkdtemp(prefix=".report.", dir=parent)
    try:
        with open(os.path.join(tmp, "report.txt"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump(numbers, f, indent=2, default=str)
        with open(os.path.join(tmp, "trace.json"), "w") as f:
            json.dump(chrome_trace(run, tl, pred), f)
        if png:
            plot_png(tl, os.path.join(tmp, "timeline.png"), pred, title=_layout(run) or "")
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": out, "text": text, "numbers": numbers}
