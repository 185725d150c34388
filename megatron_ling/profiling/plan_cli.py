"""ling-plan: pipeline layout planner, schedule simulator and unit calibration for Ling 2.0.

  ling-plan layout    --preset ling-1t --pp 21 --vpp 2 --micro-batches 84 [--seq-length 4096 --mbs 1
                      --tp 1 --ep 8 --cp 1 --dp 96 --recompute full --mem-cap 80 --calibration cal.json
                      --evaluate LAYOUT --mtp-standalone --json]
  ling-plan calibrate --preset ling-small --seq-length 256 --mbs 1 --out cal.json [--reps 5 --force]
  ling-plan measure   --preset ling-tiny --pp 2 --layouts 'Ett|ttmL' 'Et|tttmL' --micro-batches 4
                      --seq-length 64 --mbs 2 --out DIR      (real gloo runs on local CPU ranks)
  ling-plan hparams   --compute 1e22 | --preset ling-flash-2.0 --tokens 20e12   (scaling laws, FACTS §6)
  ling-plan memory    RECIPE [--world-size N] [key=value ...]   (per-rank bytes of a recipe)

Model shape: --preset NAME or --hf-config DIR, then --set field=value (LingConfig / HF field names).
"""
from __future__ import annotations

import argparse
import json
import sys

from megatron_ling.config_utils import cli_int
from megatron_ling.errors import LingConfigError, cli_main

GiB = 1024 ** 3


def _model(args):
    from megatron_ling.models.config import LingConfig, get_preset

    if args.hf_config:
        cfg = LingConfig.from_hf_config(args.hf_config)
    else:
        cfg = get_preset(args.preset)
    over = {}
    for kv in args.set or []:
        if "=" not in kv:
            raise LingConfigError(f"--set: expected field=value, got {kv!r}")
        k, v = kv.split("=", 1)
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            pass
        over[k] = v
    if over:
        cfg = cfg.replace(**over)
    return cfg.validate()


def _add_model(p):
    p.add_argument("--preset", default="ling-mini-2.0", help="model preset (ling-mini-2.0, ling-flash-2.0, ling-1t, "
                   "ling-tiny, ling-small)")
    p.add_argument("--hf-config", default=None, help="HF model directory or config.json instead of a preset")
    p.add_argument("--set", nargs="*", metavar="FIELD=VALUE", help="override LingConfig fields")
    p.add_argument("--seq-length", type=cli_int(1), default=4096)
    p.add_argument("--mbs", type=cli_int(1), default=1, help="micro batch size")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ling-plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    lay = sub.add_parser("layout", help="search the pipeline layout minimising simulated iteration time")
    _add_model(lay)
    lay.add_argument("--pp", type=cli_int(1), required=True)
    lay.add_argument("--vpp", type=cli_int(1), default=1)
    lay.add_argument("--micro-batches", type=cli_int(1), required=True, help="micro batches per iteration per DP rank")
    lay.add_argument("--tp", type=cli_int(1), default=1)
    lay.add_argument("--ep", type=cli_int(1), default=1)
    lay.add_argument("--cp", type=cli_int(1), default=1)
    lay.add_argument("--dp", type=cli_int(1), default=1, help="data parallel size (shards optimizer state in the memory model)")
    lay.add_argument("--recompute", default="none", choices=["none", "full", "mtp"])
    lay.add_argument("--mem-cap", type=float, default=None, help="per-rank memory cap in GiB")
    lay.add_argument("--calibration", default=None, help="JSON from `ling-plan calibrate`")
    lay.add_argument("--evaluate", default=None, metavar="LAYOUT", help="only simulate this layout string")
    mtp = lay.add_mutually_exclusive_group()
    mtp.add_argument("--mtp-standalone", dest="mtp_standalone", action="store_const", const=True, default=None,
                     help="force MTP on its own stage before the loss (default: tried wherever it runs: pp > 1, and pp > 2 with vpp > 1)")
    mtp.add_argument("--mtp-with-loss", dest="mtp_standalone", action="store_const", const=False,
                     help="keep MTP in the loss stage")
    lay.add_argument("--time-budget", type=float, default=20.0, help="search time limit, seconds")
    lay.add_argument("--json", action="store_true", help="print a JSON result instead of tables")

    cal = sub.add_parser("calibrate", help="time each unit type (E, D, M, MTP_T, MTP_L, L) with the real modules")
    _add_model(cal)
    cal.add_argument("--out", required=True)
    cal.add_argument("--reps", type=cli_int(1), default=5)
    cal.add_argument("--threads", type=cli_int(1), default=1)
    cal.add_argument("--force", action="store_true")
    cal.add_argument("--nice", type=int, default=None, help="renice the timing process (e.g. -10; needs privilege)")

    mea = sub.add_parser("measure", help="run layouts for real on local CPU ranks (gloo) under the bubble profiler")
    _add_model(mea)
    mea.add_argument("--pp", type=cli_int(1), required=True)
    mea.add_argument("--layouts", nargs="+", required=True)
    mea.add_argument("--micro-batches", type=cli_int(1), required=True)
    mea.add_argument("--steps", type=cli_int(1), default=3)
    mea.add_argument("--out", required=True)
    mea.add_argument("--timeout", type=float, default=600.0)
    mea.add_argument("--force", action="store_true", help="reuse a non-empty --out folder")
    mea.add_argument("--nice", type=int, default=None, help="renice the ranks (e.g. -10; needs privilege)")
    from megatron_ling.scaling.cli import add_parsers

    add_parsers(sub)
    return p


def _fmt_eval(ev, title) -> list[str]:
    ms = 1e3
    lines = [f"{title}: {ev.layout}",
             f"  iteration {ev.iteration_s * ms:.1f} ms, bubble per rank "
             + " ".join(f"{b:.3f}" for b in ev.bubbles) + f" (mean {sum(ev.bubbles) / len(ev.bubbles):.3f}), "
             f"peak memory {ev.max_mem_gib:.1f} GiB"]
    lines.append(f"  {'stage':>5} {'rank':>4} {'chunk':>5} {'units':<16} {'fwd ms':>8} {'bwd ms':>8} {'act MiB/mb':>10} {'param GiB':>9}")
    for s in ev.stages:
        u = s.units if len(s.units) <= 16 else s.units[:13] + "..."
        lines.append(f"  {s.index:>5} {s.rank:>4} {s.chunk:>5} {u:<16} {s.fwd_s * ms:>8.2f} {s.bwd_s * ms:>8.2f} "
                     f"{s.act_bytes / 2 ** 20:>10.1f} {s.param_bytes / GiB:>9.2f}")
    lines.append("  rank memory GiB: " + " ".join(f"{m / GiB:.1f}" for m in ev.rank_mem_bytes))
    return lines


def cmd_layout(args) -> int:
    from megatron_ling.pipeline.costmodel import Calibration, CostOptions
    from megatron_ling.pipeline.planner import evaluate_layout, plan

    cfg = _model(args)
    opts = CostOptions(seq_length=args.seq_length, micro_batch_size=args.mbs, tp=args.tp, ep=args.ep,
                       cp=args.cp, dp=args.dp, recompute=args.recompute)
    cal = Calibration.load(args.calibration) if args.calibration else None
    if args.evaluate:
        ev = evaluate_layout(cfg, args.evaluate, args.pp, args.micro_batches, opts, calibration=cal)
        if args.json:
            print(json.dumps({"layout": ev.layout, "iteration_s": ev.iteration_s, "bubbles": ev.bubbles,
                              "rank_mem_gib": [m / GiB for m in ev.rank_mem_bytes]}))
        else:
            print("\n".join(_fmt_eval(ev, "layout")))
        return 0
    res = plan(cfg, args.pp, args.vpp, args.micro_batches, opts, mem_cap_gib=args.mem_cap, calibration=cal,
               time_budget_s=args.time_budget, mtp_standalone=args.mtp_standalone)
    if args.json:
        print(json.dumps({"layout": res.best.layout, "iteration_s": res.best.iteration_s, "bubbles": res.best.bubbles,
                          "uniform_layout": res.uniform.layout, "uniform_iteration_s": res.uniform.iteration_s,
                          "uniform_bubbles": res.uniform.bubbles, "gain": res.gain,
                          "rank_mem_gib": [m / GiB for m in res.best.rank_mem_bytes], "notes": res.notes,
                          "search_s": res.seconds, "evaluations": res.evaluations}))
        return 0
    print("\n".join(_fmt_eval(res.best, "planned layout")))
    print()
    print("\n".join(_fmt_eval(res.uniform, "uniform split")))
    print()
    print(f"pipeline_model_parallel_layout: \"{res.best.layout}\"")
    print(f"simulated iteration time {res.best.iteration_s * 1e3:.1f} ms vs uniform {res.uniform.iteration_s * 1e3:.1f} ms: "
          f"{res.gain * 100:.1f}% less ({res.evaluations} layouts simulated in {res.seconds:.1f} s; "
          f"times from {'calibration ' + args.calibration if cal else 'the analytic cost model'})")
    for n in res.notes:
        print(f"note: {n}")
    return 0


def cmd_calibrate(args) -> int:
    import os

    from megatron_ling.profiling.driver import calibrate, renice

    cfg = _model(args)
    renice(args.nice)
    if os.path.exists(args.out) and not args.force:
        raise LingConfigError(f"--out: {args.out} exists; pass --force to overwrite")
    cal = calibrate(cfg, args.seq_length, args.mbs, reps=args.reps, threads=args.threads)
    cal.meta["model"] = cfg.to_hf_dict()
    cal.save(args.out, force=True)
    for k, v in cal.units.items():
        print(f"{k:>6}: fwd {v['fwd_s'] * 1e3:8.2f} ms  bwd {v['bwd_s'] * 1e3:8.2f} ms")
    print(f"wrote {args.out}")
    return 0


def cmd_measure(args) -> int:
    import os

    from megatron_ling.profiling.driver import measure_layouts

    cfg = _model(args)
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.force:
        raise LingConfigError(f"--out: {args.out} is not empty; pass --force to overwrite its profiles")
    res = measure_layouts(cfg, args.pp, args.layouts, args.seq_length, args.mbs, args.micro_batches, args.out,
                          steps=args.steps, timeout_s=args.timeout, niceness=args.nice)
    for r in res:
        print(f"{r['layout']:<40} fastest iteration {r['iteration_s'] * 1e3:8.1f} ms (median {r['median_s'] * 1e3:.1f})"
              f"   profiles: {r['run_dir']}")
    return 0


@cli_main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_ling.scaling.cli import run as scaling_cmd

    return {"layout": cmd_layout, "calibrate": cmd_calibrate, "measure": cmd_measure,
            "hparams": scaling_cmd, "memory": scaling_cmd}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
