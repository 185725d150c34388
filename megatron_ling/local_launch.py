"""The one launcher for local (single-host) multi-process runs.

* :func:`run_local` forks ``world`` processes that each run ``fn(rank, world, port, *args)`` with
  the launcher environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) set, and kills them
  all on the first failure or on timeout (the profiler driver, the converters' isolated check).
* :func:`torchrun_local` re-runs a CLI module under torchrun's standalone rendezvous
  (``ling-train --nproc-per-node N``).

Cluster jobs go through ``ling-slurm`` (``megatron_ling.launch``).

Why a top-level leaf module and not ``launch/``: the Slurm package validates a recipe before it
submits (``launch.submit`` imports ``training.recipe``), while ``ling-train --nproc-per-node`` and
the profiler driver need this launcher; inside ``launch`` that is a training <-> launch package
cycle. This module imports nothing of megatron_ling but ``utils``, so ``training`` and
``profiling`` may depend on it and nothing depends back (tests/test_structure.py).
"""
from __future__ import annotations

import os
import sys
import time

from megatron_ling.utils import free_port


def _rank_main(rank: int, fn, world: int, port: int, args: tuple):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    return fn(rank, world, port, *args)


def run_local(fn, world: int, args: tuple = (), timeout_s: float = 300.0) -> None:
    """Run ``fn(rank, world, port, *args)`` in ``world`` forked processes; kill them all and raise
    on timeout or on the first failure."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_rank_main, args=(fn, world, free_port(), tuple(args)), nprocs=world,
                             start_method="fork", join=False)
    deadline = time.time() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.time() > deadline:
                raise TimeoutError(f"local run did not finish within {timeout_s:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def torchrun_local(nproc: int, module: str, argv: list) -> int:
    """``torchrun --standalone --nproc_per_node=N -m module argv...``; returns the exit status."""
    from torch.distributed import run as torchrun

    try:
        torchrun.main(["--standalone", f"--nproc_per_node={nproc}", "-m", module, *argv])
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # ChildFailedError: the workers already printed their error
        print(f"error: run failed ({type(e).__name__}); see the worker output above", file=sys.stderr)
        return 1
    return 0
