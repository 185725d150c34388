"""Benchmark ling-convert: throughput vs a plain copy of the same bytes, and peak memory.

Builds a synthetic HF checkpoint at Ling-mini-2.0 widths (hidden 2048, 256 experts of 512,
vocab 157,184) with fewer layers (default: 1 dense + 1 MoE layer, ~3.0 GB bf16; --mtp 1 adds the MTP layer),
then times, each in a fresh subprocess, --reps times in alternation (median reported):

  copy      a durable copy of the step's input (copyfile + fsync): the I/O ceiling, same run
  copy x2   the same copy by 2 processes at once (each half the files): whether the machine's own
            copy scales to 2 processes in this run, i.e. whether the copy is the 2-worker limit
  write     the same bytes written from memory with write() + fsync: the ceiling of anything that
            writes from user memory (the converters' casts, QKV, record framing), same run
  from-hf   HF dir -> torch_dist checkpoint, with each --workers count
  to-hf     that torch_dist checkpoint -> HF dir (bf16), with each --workers count

and prints throughput, the ratio to the copy and to 1 worker, when the started workers were ready
(with N workers the CLI's own process is one of them and converts meanwhile),
peak RSS per worker, and a projection of Ling-1T conversion time from the converters' own plan of
Ling-1T and the measured 1-worker rate.

Goals (issues 4, 14): 1 worker >= 0.8x the copy; 2 workers >= 1.6x 1 worker where the copy is not
the limit; peak RSS per worker <= 2x the largest layer.

  python bench/convert.py [--work DIR] [--layers 2] [--mtp 1] [--workers 1,2] [--reps 3] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time


def build_hf(out: str, layers: int, mtp: int) -> tuple[int, int]:
    """Synthetic HF dir; returns (total bytes, bytes of the largest layer)."""
    import torch

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


def timed(cmd: list[str]) -> tuple[float, int, float, float]:
    """Conversion seconds the command reports itself (' in <s> s ', without Python/torch start-up;
    the wall time when it reports none), the peak RSS of one worker (the one the CLI reports,
    'peak RSS per worker', else the process's own: wait4) and the seconds its worker processes
    took to start ('workers started in <s> s'; 0 for one worker, which runs in the CLI's process),
    and the cores it kept busy: CPU seconds (user + system, its waited-for workers included) / wall
    seconds of the whole command, interpreter start-up in both."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    m = re.search(r" in ([0-9.]+) s ", out)
    r = re.search(r"peak RSS per worker ([0-9.]+) GB", out)
    w = re.search(r"workers started in ([0-9.]+) s", out)
    return (float(m.group(1)) if m else dt, int(float(r.group(1)) * 1e9) if r else ru.ru_maxrss * 1024,
            float(w.group(1)) if w else 0.0, (ru.ru_utime + ru.ru_stime) / dt)


def dir_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def durable_copy(src: str, dst: str, files: list[str]) -> None:
    """Copy ``files`` (relative to ``src``) to ``dst`` with ``shutil.copyfile`` (sendfile in the
    kernel), then fsync each: the converters fsync their output before the final rename too."""
    for rel in files:
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        shutil.copyfile(os.path.join(src, rel), os.path.join(dst, rel))
        fd = os.open(os.path.join(dst, rel), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def copy_main(src: str, dst: str, procs: int) -> None:
    """The durable copy of ``src`` by ``procs`` processes at once, each a share of the files
    balanced by size as the converters' workers split units (``parallel_exec.partition``); prints
    its time."""
    from megatron_ling.convert.parallel_exec import Unit, partition

    files = sorted(os.path.relpath(os.path.join(r, f), src) for r, _, fs in os.walk(src) for f in fs)
    units = [Unit(rel, os.path.getsize(os.path.join(src, rel))) for rel in files]
    shares = [[files[i] for i in part] for part in partition(units, procs)]
    t = time.perf_counter()
    if procs == 1:
        durable_copy(src, dst, files)
    else:  # this script's --copy-files children import no torch: they start in ~30 ms
        ps = [subprocess.Popen([sys.executable, __file__, "--copy-files", src, dst] + sh) for sh in shares if sh]
        if any(p.wait() for p in ps):
            raise SystemExit("copy failed")
    print(f"copy in {time.perf_counter() - t:.3f} s ")


def copy_cmd(src: str, dst: str, procs: int = 1) -> list[str]:
    return [sys.executable, __file__, "--copy", src, dst, "--procs", str(procs)]


def write_cmd(src: str, dst: str) -> list[str]:
    """The user-space write ceiling: the same bytes, file by file, read into memory first (not
    timed), then written with write() from that memory and fsynced (timed): the ceiling of what a
    converter writes from user memory (casts, QKV, record framing); what it copies in the kernel
    (copy_file_range, like the durable copy's sendfile) is not bound by it."""
    code = (f"import os, time\nos.makedirs({dst!r})\ntotal = 0.0\n"
            f"for r, _, fs in os.walk({src!r}):\n"
            f"    for n in fs:\n"
            f"        data = open(os.path.join(r, n), 'rb').read()\n"
            f"        t = time.perf_counter()\n"
            f"        with open(os.path.join({dst!r}, n), 'wb') as f:\n"
            f"            f.write(data); f.flush(); os.fsync(f.fileno())\n"
            f"        total += time.perf_counter() - t\n"
            f"        del data\n"
            f"print(f'write in {{total:.3f}} s ')")
    return [sys.executable, "-c", code]


# measured beside the converters, same input. "copy x2": the durable copy by 2 processes at once,
# how far the machine's own copy scales to 2 processes in this run (the 2-worker goal holds "where
# the copy itself is not the limit")
BASELINES = {"copy": copy_cmd, "copy x2": lambda src, dst: copy_cmd(src, dst, 2), "write": write_cmd}


def ling_1t_plan(step: str, unit_size: int) -> list[int]:
    """Byte costs of the units the converter plans for Ling-1T in bf16 (with its MTP layer), from
    the mapping table's shapes and the converters' own packing: from-hf's ``.distcp`` files,
    to-hf's safetensors shards, each of ``unit_size`` (the CLI default, 5 GB)."""
    import torch

    from megatron_ling.convert import mapping as M
    from megatron_ling.convert.from_hf import FromHFJob
    from megatron_ling.convert.hf_io import ShardPlan, nbytes
    from megatron_ling.models.config import get_preset

    cfg = get_preset("ling-1t")
    plan = [(n, s, torch.float32 if r == "expert_bias" else torch.bfloat16)
            for u in M.units(cfg) for r in M.layer_roles(cfg, u) for n, s in M.hf_names(cfg, u, r)]
    if step == "to-hf":
        shards = ShardPlan(plan, unit_size)
        return [shards.shard_bytes(i) for i in range(len(shards.files))]
    return [size for _, size in FromHFJob._pack(cfg, True, unit_size, {n: nbytes(s, d) for n, s, d in plan})]


def makespan(costs: list[int], workers: int) -> int:
    """Bytes the busiest of ``workers`` converts under the converters' own partition."""
    from megatron_ling.convert.parallel_exec import Unit, partition

    units = [Unit(str(i), c) for i, c in enumerate(costs)]
    return max(sum(costs[i] for i in p) for p in partition(units, workers))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/ling_convert_bench")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--mtp", type=int, default=0)
    ap.add_argument("--workers", default="1,2", help="worker counts to measure (comma separated)")
    ap.add_argument("--reps", type=int, default=3, help="alternating repetitions (median reported)")
    ap.add_argument("--unit-size", default="400MB",
                    help="--shard-size / --file-size: the units workers split (default 400MB)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--build-only", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--copy", nargs=2, default=None, help=argparse.SUPPRESS)  # SRC DST: a timed baseline
    ap.add_argument("--procs", type=int, default=1, help=argparse.SUPPRESS)
    if sys.argv[1:2] == ["--copy-files"]:  # SRC DST FILE...: one share of a --copy --procs N
        return durable_copy(sys.argv[2], sys.argv[3], sys.argv[4:])
    a = ap.parse_args()
    if a.copy:
        return copy_main(*a.copy, a.procs)
    if a.build_only:
        sizes = build_hf(a.build_only, a.layers, a.mtp)
        json.dump(sizes, open(os.path.join(a.build_only, "bench_sizes.json"), "w"))
        return
    counts = [int(x) for x in a.workers.split(",")]
    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)
    hf, ck = os.path.join(a.work, "hf"), os.path.join(a.work, "ckpt")
    # built in a child process: a forked child's ru_maxrss counts the parent's pages, so the
    # parent stays small for the RSS of the timed runs to be theirs alone
    t = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--build-only", hf, "--layers", str(a.layers), "--mtp", str(a.mtp)],
                   check=True)
    total, largest = json.load(open(os.path.join(hf, "bench_sizes.json")))
    print(f"synthetic HF checkpoint: {total / 1e9:.2f} GB, largest layer {largest / 1e9:.2f} GB "
          f"(built in {time.perf_counter() - t:.0f} s); load average {os.getloadavg()[0]:.1f}", flush=True)
    py = [sys.executable, "-m", "megatron_ling.convert.cli"]
    u = ["--no-progress"]
    steps = {"from-hf": (hf, lambda src, dst, w: py + ["from-hf", src, dst, "--file-size", a.unit_size,
                                                       "--workers", str(w)] + u),
             "to-hf": (ck, lambda src, dst, w: py + ["to-hf", src, dst, "--dtype", "bf16", "--shard-size",
                                                     a.unit_size, "--workers", str(w)] + u)}
    subprocess.run(steps["from-hf"][1](hf, ck, 1), check=True, stdout=subprocess.DEVNULL)  # to-hf's input
    times: dict = {}
    for rep in range(a.reps):  # alternate copy and conversions so that load swings hit all alike
        for step, (src, cmd) in steps.items():
            # odd reps run in reverse order: on a VM the cost of fresh page-cache memory swings with
            # what ran just before (seen here: one copy 128 MB/s, the next 4 GB/s)
            kinds = list(BASELINES) + counts
            for kind in kinds if rep % 2 == 0 else kinds[::-1]:
                dst = os.path.join(a.work, "out")
                shutil.rmtree(dst, ignore_errors=True)
                c = BASELINES[kind](src, dst) if kind in BASELINES else cmd(src, dst, kind)
                dt, rss, up, cores = timed(c)
                times.setdefault((step, kind), []).append((dt, rss, up, cores))
                print(f"  rep {rep}: {step} {kind if isinstance(kind, str) else f'{kind} worker(s)'}: {dt:.1f} s"
                      f"{f' (workers started in {up:.1f} s)' if up else ''}, {cores:.2f} cores busy, RSS {rss / 1e9:.2f} GB "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
    shutil.rmtree(os.path.join(a.work, "out"), ignore_errors=True)
    med = {k: statistics.median(d for d, _, _, _ in v) for k, v in times.items()}
    busy = {k: statistics.median(c for _, _, _, c in v) for k, v in times.items()}
    size = {"from-hf": dir_bytes(hf), "to-hf": dir_bytes(ck)}
    print(f"\n| step | workers | bytes in | convert s (median of {a.reps}) | MB/s | durable copy MB/s "
          f"(same run) | vs copy | user-space write MB/s (same run) | vs write | vs 1 worker | "
          f"started workers ready after s | copy by 2 processes vs 1 (same run) | "
          f"cores busy | peak RSS per worker | RSS / largest layer |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rates = {}
    for step in steps:
        copy_bps = size[step] / med[(step, "copy")]
        write_bps = size[step] / med[(step, "write")]
        for w in counts:
            bps = size[step] / med[(step, w)]
            rates[(step, w)] = bps
            rss = max(r for _, r, _, _ in times[(step, w)])
            up = statistics.median(u for _, _, u, _ in times[(step, w)])
            print(f"| {step} | {w} | {size[step] / 1e9:.2f} GB | {med[(step, w)]:.1f} | {bps / 1e6:.0f} | "
                  f"{copy_bps / 1e6:.0f} | {bps / copy_bps:.2f}x | {write_bps / 1e6:.0f} | {bps / write_bps:.2f}x | "
                  f"{bps / rates[(step, counts[0])]:.2f}x | {up:.1f} | "
                  f"{med[(step, 'copy')] / med[(step, 'copy x2')]:.2f}x | {busy[(step, w)]:.2f} | "
                  f"{rss / 1e9:.2f} GB | {rss / largest:.2f}x |")
    print(f"(cores busy: CPU s / wall s of the whole command; with {os.cpu_count()} cores, N workers can be "
          f"at most {os.cpu_count()} / (1 worker's cores busy) x one worker)")
    print("\nLing-1T projection (bf16, the CLI's default 5 GB files / shards): minutes = bytes the busiest "
          "worker converts under the converters' own plan and partition (Ling-1T's units from the mapping "
          "table's shapes) / the measured 1-worker rate above; i.e. every worker keeps the 1-worker rate "
          "(assumes storage and cores keep up; the measured 2-worker scaling on this machine is in the table)")
    for step in steps:
        r1 = rates[(step, counts[0])]
        costs = ling_1t_plan(step, 5 * 1024 ** 3)
        cells = ", ".join(f"{n} node(s) x {w} workers: {makespan(costs, n * w) / r1 / 60:.1f} min"
                          for n, w in ((1, 1), (1, 16), (8, 16), (32, 16)))
        print(f"  {step} ({sum(costs) / 1e12:.2f} TB in {len(costs)} units, largest "
              f"{max(costs) / 1e9:.1f} GB): {cells}")
    print(f"(largest layer {largest / 1e9:.2f} GB; cores {os.cpu_count()}; load average now "
          f"{os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d')})")
    with open(os.path.join(a.work, "result.json"), "w") as f:
        json.dump({"times": {f"{k[0]}:{k[1]}": v for k, v in times.items()}, "largest_layer": largest}, f)
    if not a.keep:
        shutil.rmtree(a.work, ignore_errors=True)


if __name__ == "__main__":
    main()
