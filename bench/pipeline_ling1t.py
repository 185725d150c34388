"""Heterogeneous pipeline layouts for Ling-1T: planner vs the uniform split (simulated).

Reproduces the two cases of the Ling 2.0 report (FACTS §4) with megatron-ling's cost model and
megatron-core 0.16.1 schedule simulator:

* Ling-1T (4 dense + 76 MoE layers + 1 MTP, vocab 157k) at TP1 EP8 PP21 VPP2, 4k sequences,
  full recompute (2016 GPUs: DP = 2016 / 21 / 8 * 8 = 96, expert-DP 12);
* the report's example "3 D + 15 M + 1 MTP over PP=5" (Ling-1T layer shapes).

For each: the uniform split (layers spread evenly, MTP + loss on the last stage, as megatron-core
lays out by default), the planner's layout with MTP and the
loss on the last stage, and the planner's layout with the MTP layer on its own (virtual) stage,
which is what Ling 2.0's scheduler does (runnable on 0.16.1 and 0.19 since compat's
gloo_shape_exchange; verified against the single process).

Times are from the analytic cost model (Hopper bf16 at 45% of peak, EP all-to-all at 150 GB/s)
unless --calibration gives measured unit times. Usage:

    python bench/pipeline_ling1t.py [--micro-batches 84] [--calibration cal.json] [--mem-cap 80]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ling.models.config import get_preset  # noqa: E402
from megatron_ling.pipeline.costmodel import Calibration, CostOptions  # noqa: E402
from megatron_ling.pipeline.planner import plan  # noqa: E402


def short(layout: str, width: int = 64) -> str:
    return layout if len(layout) <= width else layout[: width - 3] + "..."


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--micro-batches", type=int, default=84, help="micro batches per iteration, PP=21 case")
    ap.add_argument("--micro-batches-pp5", type=int, default=20)
    ap.add_argument("--calibration", default=None)
    ap.add_argument("--mem-cap", type=float, default=None, help="GiB per rank")
    ap.add_argument("--time-budget", type=float, default=20.0)
    args = ap.parse_args()
    cal = Calibration.load(args.calibration) if args.calibration else None

    one_t = get_preset("ling-1t")
    small = get_preset("ling-1t", num_hidden_layers=18, first_k_dense_replace=3)
    cases = [
        ("Ling-1T 4D+76M+MTP", one_t, 21, 2, args.micro_batches,
         CostOptions(seq_length=4096, micro_batch_size=1, tp=1, ep=8, dp=12, recompute="full")),
        ("Ling-1T 4D+76M+MTP", one_t, 21, 1, args.micro_batches,
         CostOptions(seq_length=4096, micro_batch_size=1, tp=1, ep=8, dp=12, recompute="full")),
        ("3D+15M+MTP (1T shapes)", small, 5, 1, args.micro_batches_pp5,
         CostOptions(seq_length=4096, micro_batch_size=1, tp=1, ep=8, dp=12, recompute="full")),
    ]
    rows = []
    for name, cfg, pp, vpp, m, opts in cases:
        t = time.time()
        stock = plan(cfg, pp, vpp, m, opts, mem_cap_gib=args.mem_cap, calibration=cal, time_budget_s=args.time_budget,
                     mtp_standalone=False)
        t_stock = time.time() - t
        t = time.time()
        alone = plan(cfg, pp, vpp, m, opts, mem_cap_gib=args.mem_cap, calibration=cal, time_budget_s=args.time_budget,
                     mtp_standalone=True)
        t_alone = time.time() - t
        uni = stock.uniform
        for label, ev, gain, secs in [("uniform split", uni, 0.0, 0.0),
                                      ("planner (MTP+L last)", stock.best, stock.gain, t_stock),
                                      ("planner, MTP own stage (runs)",
                                       alone.best, alone.gain, t_alone)]:
            rows.append((name, f"PP{pp} VPP{vpp} m={m}", label, ev.iteration_s, sum(ev.bubbles) / len(ev.bubbles),
                         max(ev.bubbles), gain, ev.max_mem_gib, secs, ev.layout))

    hdr = (f"{'case':<24} {'parallel':<16} {'layout':<33} {'iter s':>8} {'bubble':>7} {'max':>6} "
           f"{'gain':>7} {'mem GiB':>8} {'search s':>8}")
    print(hdr)
    print("-" * len(hdr))
    for name, par, label, it, mb, xb, gain, mem, secs, lay in rows:
        print(f"{name:<24} {par:<16} {label:<33} {it:>8.2f} {mb:>7.3f} {xb:>6.3f} {gain * 100:>6.1f}% {mem:>8.1f} "
              f"{secs:>8.1f}")
    print()
    for name, par, label, *_, lay in rows:
        print(f"{name} / {label}:\n  {lay}")
    print(f"\ncost model: {'calibration ' + args.calibration if cal else 'analytic (Hopper bf16, 45% of peak)'}; "
          f"gain = iteration-time reduction vs the uniform split; bubble = mean (max) idle fraction per rank")
    return 0


if __name__ == "__main__":
    sys.exit(main())
