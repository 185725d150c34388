"""ling-convert: Megatron torch_dist <-> Hugging Face BailingMoeV2, and a logits check.

  ling-convert to-hf   CKPT_DIR OUT_DIR [--dtype bf16|fp32|fp8] [--mtp keep|drop] [--shard-size 5GB]
                       [--hf-files DIR] [--config config.json] [--force] [--workers N]
                       [--rank R --world-size W] [--no-verify-checksums]
  ling-convert from-hf HF_DIR OUT_DIR [--dtype auto|bf16|fp32] [--mtp keep|drop] [--file-size 5GB] [--force]
                       [--workers N]
                       [--rank R --world-size W]
  ling-convert verify  CKPT_DIR HF_DIR [--seq-len 32] [--batch 2] [--tol X]
"""
from __future__ import annotations

import argparse
import re
import sys

from megatron_ling.config_utils import cli_int
from megatron_ling.errors import LingConfigError, cli_main


def parse_size(s: str, field: str = "--shard-size") -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", s, re.I)
    if not m:
        raise LingConfigError(f"{field}: cannot parse {s!r}; use e.g. 5GB, 500MB or a byte count")
    mult = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=1,
                   help="workers on this node: this process and N-1 started ones, each writing "
                        "whole output files (default 1)")
    p.add_argument("--rank", type=int, default=None,
                   help="this node's share of the files (default: $RANK, or the Slurm array task)")
    p.add_argument("--world-size", type=int, default=None,
                   help="number of nodes sharing the output filesystem (default: $WORLD_SIZE, or the "
                        "Slurm array size); the last one to finish writes the index and config")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ling-convert", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-hf", help="megatron-ling torch_dist checkpoint -> HF directory")
    a.add_argument("ckpt_dir", help="checkpoint dir (with latest_checkpointed_iteration.txt) or an iter_* dir")
    a.add_argument("out_dir")
    a.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp8"],
                   help="weight dtype (fp8: blockwise 128x128 e4m3 + _scale_inv); expert_bias stays fp32")
    a.add_argument("--mtp", default="keep", choices=["keep", "drop"], help="MTP layers as HF layers L+j, or drop")
    a.add_argument("--shard-size", default="5GB", help="max bytes per safetensors shard (default 5GB)")
    a.add_argument("--hf-files", default=None, help="copy remote code, tokenizer, generation config from DIR")
    a.add_argument("--config", default=None, help="config.json to use instead of the checkpoint's ling_config")
    a.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    a.add_argument("--no-progress", action="store_true")
    a.add_argument("--no-verify-checksums", action="store_true",
                   help="skip checking the checkpoint's files against its checksums.json (faster, unsafe)")
    add_parallel_args(a)
    b = sub.add_parser("from-hf", help="HF directory -> megatron-ling torch_dist checkpoint")
    b.add_argument("hf_dir")
    b.add_argument("out_dir")
    b.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: keep the HF dtype (FP8 weights are dequantized to bf16)")
    b.add_argument("--mtp", default="keep", choices=["keep", "drop"])
    b.add_argument("--file-size", default="5GB",
                   help="max bytes per .distcp file (a MoE layer is split between files by runs of "
                        "experts; only a single tensor larger than it gets a file alone); files are the "
                        "units --workers and ranks split (default 5GB)")
    b.add_argument("--force", action="store_true")
    b.add_argument("--no-progress", action="store_true")
    add_parallel_args(b)
    c = sub.add_parser("verify", help="max |delta logits| between a checkpoint and an HF directory")
    c.add_argument("ckpt_dir")
    c.add_argument("hf_dir")
    c.add_argument("--seq-len", type=cli_int(1), default=32)
    c.add_argument("--batch", type=cli_int(1), default=2)
    c.add_argument("--tol", type=float, default=None, help="exit 1 if max |delta| exceeds this")
    c.add_argument("--no-verify-checksums", action="store_true", help="skip the checksums.json check")
    return p


@cli_main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "to-hf":
        from megatron_ling.convert.to_hf import to_hf

        r = to_hf(args.ckpt_dir, args.out_dir, dtype=args.dtype, mtp=args.mtp,
                  shard_size=parse_size(args.shard_size), hf_files=args.hf_files, config=args.config,
                  force=args.force, show_progress=not args.no_progress, workers=args.workers, rank=args.rank,
                  world_size=args.world_size, verify_checksums=not args.no_verify_checksums)
        print(r.summary)
    elif args.cmd == "from-hf":
        from megatron_ling.convert.from_hf import from_hf

        r = from_hf(args.hf_dir, args.out_dir, dtype=args.dtype, mtp=args.mtp, force=args.force,
                    show_progress=not args.no_progress, workers=args.workers, rank=args.rank,
                    world_size=args.world_size, file_size=parse_size(args.file_size, "--file-size"))
        print(r.summary)
    else:
        from megatron_ling.convert.verify import verify

        r = verify(args.ckpt_dir, args.hf_dir, seq_len=args.seq_len, batch=args.batch,
                   verify_checksums=not args.no_verify_checksums)
        print(f"max |delta logits| = {r['max_abs_diff']:.3e} (mean {r['mean_abs_diff']:.3e}, "
              f"max |logit| {r['max_abs_logit']:.3f}, {r['tokens']} tokens)")
        if args.tol is not None and r["max_abs_diff"] > args.tol:
            print(f"error: max |delta logits| {r['max_abs_diff']:.3e} exceeds --tol {args.tol}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
