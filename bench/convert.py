"""Benchmark ling-convert: throughput vs a plain copy of the same bytes, and peak memory.

Builds a synthetic HF checkpoint at Ling-mini-2.0 widths (hidden 2048, 256 experts of 512,
vocab 157,184) with fewer layers (default: 1 dense + 1 MoE layer, ~3.0 GB bf16; --mtp 1 adds the MTP layer),
then times, each in a fresh subprocess (peak RSS from wait4):

  from-hf   HF dir -> torch_dist checkpoint
  to-hf     that torch_dist checkpoint -> HF dir (bf16)
  copy      `shutil.copyfile` of the same files (the I/O ceiling on this disk)

Goals (issue 4): conversion >= 0.8x copy throughput; peak RSS <= 2x the largest layer.

  python bench/convert.py [--work /tmp/ling_convert_bench] [--layers 2] [--mtp 1] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import torch


def build_hf(out: str, layers: int, mtp: int) -> tuple[int, int]:
    """Synthetic HF dir; returns (total bytes, bytes of the largest layer)."""
    from megatron_ling.convert import mapping as M
    from megatron_ling.convert.hf_io import nbytes, write_safetensors
    from megatron_ling.models.config import get_preset

    cfg = get_preset("ling-mini-2.0", num_hidden_layers=layers, num_nextn_predict_layers=mtp)
    plan, per_unit = [], {}
    for unit in M.units(cfg):
        for role in M.layer_roles(cfg, unit):
            for name, shape in M.hf_names(cfg, unit, role):
                dt = torch.float32 if role == "expert_bias" else torch.bfloat16
                plan.append((name, shape, dt))
                per_unit[str(unit)] = per_unit.get(str(unit), 0) + nbytes(shape, dt)
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    # uniform: ~5x faster to draw than normal, same bytes
    total = write_safetensors(out, plan, 2 * 1024 ** 3, ((name, torch.empty(shape, dtype=dt).uniform_(
        -0.03, 0.03, generator=g)) for name, shape, dt in plan))
    cfg.save_hf_config(os.path.join(out, "config.json"))
    return total, max(per_unit.values())


def timed(cmd: list[str]) -> tuple[float, int, float]:
    """Wall seconds, peak RSS (bytes) of a subprocess, and the conversion time it reports itself
    (without Python/torch start-up), or the wall time when it reports none."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    m = re.search(r" in ([0-9.]+) s ", out)
    return dt, ru.ru_maxrss * 1024, float(m.group(1)) if m else dt


def dir_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def copy_cmd(src: str, dst: str) -> list[str]:
    """A durable plain copy (copytree, then fsync every file): the converters fsync their output
    before the final rename too."""
    code = (f"import os, shutil, time; t = time.perf_counter(); shutil.copytree({src!r}, {dst!r})\n"
            f"for r, _, fs in os.walk({dst!r}):\n"
            f"    for f in fs:\n"
            f"        fd = os.open(os.path.join(r, f), os.O_RDONLY); os.fsync(fd); os.close(fd)\n"
            f"print(f'copy in {{time.perf_counter() - t:.3f}} s ')")
    return [sys.executable, "-c", code]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/ling_convert_bench")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--mtp", type=int, default=0)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--build-only", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.build_only:
        sizes = build_hf(a.build_only, a.layers, a.mtp)
        json.dump(sizes, open(os.path.join(a.build_only, "bench_sizes.json"), "w"))
        return
    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)
    hf, ck, hf2 = (os.path.join(a.work, x) for x in ("hf", "ckpt", "hf_out"))
    # built in a child process: a forked child's ru_maxrss counts the parent's pages, so the
    # parent stays small for the RSS of the timed runs to be theirs alone
    t = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--build-only", hf, "--layers", str(a.layers), "--mtp", str(a.mtp)],
                   check=True)
    total, largest = json.load(open(os.path.join(hf, "bench_sizes.json")))
    print(f"synthetic HF checkpoint: {total / 1e9:.2f} GB, largest layer {largest / 1e9:.2f} GB "
          f"(built in {time.perf_counter() - t:.0f} s)", flush=True)
    py = [sys.executable, "-m", "megatron_ling.convert.cli"]
    rows = []
    # warm the page cache identically for every run: each reads files just written/read
    _, rss_c1, dt_c1 = timed(copy_cmd(hf, os.path.join(a.work, "copy_hf")))
    wall_f, rss_f, dt_f = timed(py + ["from-hf", hf, ck, "--no-progress"])
    _, rss_c2, dt_c2 = timed(copy_cmd(ck, os.path.join(a.work, "copy_ckpt")))
    wall_t, rss_t, dt_t = timed(py + ["to-hf", ck, hf2, "--dtype", "bf16", "--no-progress"])
    b_hf, b_ck = dir_bytes(hf), dir_bytes(ck)
    rows.append(("from-hf", b_hf, dt_f, wall_f, rss_f, b_hf / dt_c1))
    rows.append(("to-hf", b_ck, dt_t, wall_t, rss_t, b_ck / dt_c2))
    print("\n| step | bytes in | convert s (process wall s) | MB/s | durable copy MB/s (same bytes) | vs copy "
          "| peak RSS | RSS / largest layer |")
    print("|---|---|---|---|---|---|---|---|")
    for name, b, dt, wall, rss, copy_bps in rows:
        print(f"| {name} | {b / 1e9:.2f} GB | {dt:.1f} ({wall:.1f}) | {b / 1e6 / dt:.0f} | {copy_bps / 1e6:.0f} | "
              f"{b / dt / copy_bps:.2f}x | {rss / 1e9:.2f} GB | {rss / largest:.2f}x |")
    print(f"\n(copy runs: hf {dt_c1:.1f} s / {rss_c1 / 1e6:.0f} MB RSS, ckpt {dt_c2:.1f} s / {rss_c2 / 1e6:.0f} MB RSS; "
          f"largest layer {largest / 1e9:.2f} GB; cores {os.cpu_count()}; load average {os.getloadavg()[0]:.1f})")
    with open(os.path.join(a.work, "result.json"), "w") as f:
        json.dump({"rows": rows, "largest_layer": largest}, f)
    if not a.keep:
        shutil.rmtree(a.work, ignore_errors=True)


if __name__ == "__main__":
    main()
