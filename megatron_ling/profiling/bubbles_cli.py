"""ling-bubbles: pipeline bubble reports of profiled runs.

  ling-bubbles report RUN_DIR [--iteration N] [--out DIR] [--calibration FILE] [--no-png] [--force]

RUN_DIR is a training run directory whose bubbles/ folder holds the per-rank profiles written by
ling-train with ``profiling.enabled=true`` (or that bubbles/ folder itself). Writes
RUN_DIR/bubbles/report/{report.txt, report.json, trace.json (Chrome/Perfetto), timeline.png}
and prints the table.
"""
from __future__ import annotations

import argparse
import sys

from megatron_ling.errors import cli_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ling-bubbles", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("report", help="merge per-rank profiles; table, trace JSON, PNG, simulated prediction")
    r.add_argument("run_dir", metavar="RUN_DIR")
    r.add_argument("--iteration", type=int, default=None, help="recorded iteration to show (default: the last)")
    r.add_argument("--out", default=None, help="output folder (default RUN_DIR/bubbles/report)")
    r.add_argument("--calibration", default=None,
                   help="predict from unit costs of this `ling-plan calibrate` file instead of the run's own stage times")
    r.add_argument("--no-png", action="store_true")
    r.add_argument("--force", action="store_true", help="overwrite an existing report folder")
    return p


@cli_main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "report":
        from megatron_ling.profiling.report import write_report

        res = write_report(args.run_dir, out=args.out, iteration=args.iteration, calibration=args.calibration,
                           force=args.force, png=not args.no_png)
        print(res["text"])
        print(f"\nwrote {res['out']}/{{report.txt,report.json,trace.json{',timeline.png' if not args.no_png else ''}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
