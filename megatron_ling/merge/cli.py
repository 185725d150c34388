"""ling-merge: merge checkpoints of one run, θ̂ = Σ c_j θ_{n+j} (WSM, arXiv 2507.17634).

  ling-merge CKPT_DIR [CKPT_DIR|ITER_DIR ...] --last K --out OUT [--shape 1-sqrt] [--hf [--dtype bf16]]
             [--workers N] [--rank R --world-size W] [--file-size 5GB] [--no-verify-checksums]
  ling-merge CKPT_DIR --iterations 400 500 600 --shape weights --weights 1 2 3 --out OUT
  ling-merge CKPT_DIR --last 8 --shape cosine --dry-run        # print checkpoints and coefficients

Shapes: linear | cosine | 1-sqrt | exponential (--exp-rate) | mean | ema (--ema-decay) |
weights (--weights, one per checkpoint, oldest first, normalised to sum 1). See docs/merge.md.
"""
from __future__ import annotations

import argparse
import sys

from megatron_ling.config_utils import cli_int
from megatron_ling.convert.cli import add_parallel_args, parse_size
from megatron_ling.errors import LingConfigError, cli_main
from megatron_ling.merge.coefficients import SHAPES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ling-merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="checkpoint directories (every iter_* inside) and/or iter_* directories")
    p.add_argument("--out", default=None, help="output directory (required unless --dry-run)")
    p.add_argument("--last", type=cli_int(1), default=None, help="merge the newest K checkpoints (evenly spaced)")
    p.add_argument("--iterations", type=int, nargs="+", default=None, help="merge exactly these iterations")
    p.add_argument("--shape", default="1-sqrt", choices=SHAPES, help="decay to emulate (default 1-sqrt, the "
                   "paper's best)")
    p.add_argument("--ema-decay", type=float, default=0.9, help="ema: e_j = a*e_(j-1) + (1-a)*theta_j")
    p.add_argument("--exp-rate", type=float, default=5.0, help="exponential: w(t) = exp(-rate*t)")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="--shape weights: c_j, oldest first")
    p.add_argument("--expert-bias", default="merge", choices=["merge", "last"],
                   help="router expert bias: merged like the weights (default) or the newest checkpoint's")
    p.add_argument("--hf", action="store_true", help="write a Hugging Face directory instead of torch_dist")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp8"], help="--hf weight dtype")
    p.add_argument("--dry-run", action="store_true", help="print the checkpoints and coefficients, write nothing")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true")
    add_parallel_args(p)  # --workers, --rank, --world-size: as ling-convert's
    p.add_argument("--file-size", default="5GB", help="max bytes per output file: .distcp, or safetensors shard with --hf "
                   "(default 5GB); files are the units --workers and ranks split")
    p.add_argument("--no-verify-checksums", action="store_true",
                   help="skip checking the checkpoints' files against their checksums.json (faster, unsafe)")
    return p


@cli_main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_ling.merge.merge import MergedCheckpoint, merge, plan_merge

    if not args.dry_run and not args.out:
        raise LingConfigError("--out: give the output directory (or --dry-run to only print the plan)")
    plan = plan_merge(args.inputs, last=args.last, iterations=args.iterations, shape=args.shape,
                      ema_decay=args.ema_decay, exp_rate=args.exp_rate, weights=args.weights)
    if args.dry_run:
        MergedCheckpoint(plan, args.expert_bias, not args.no_verify_checksums)  # checks only, nothing written
        print(plan.table())
        return 0
    r = merge(plan, args.out, expert_bias=args.expert_bias, hf=args.hf, hf_dtype=args.dtype, force=args.force,
              show_progress=not args.no_progress, workers=args.workers,
              file_size=parse_size(args.file_size, "--file-size"), verify_checksums=not args.no_verify_checksums,
              rank=args.rank, world_size=args.world_size)
    print(plan.table())
    print(r.summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
