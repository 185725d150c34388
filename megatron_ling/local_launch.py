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
import signal
import subprocess
import sys
import time
from typing import Optional

from megatron_ling.utils import rendezvous_env, reserve_port, signal_when_parent_dies


def _rank_main(rank: int, fn, world: int, listener, args: tuple):
    env = rendezvous_env(listener, rank)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), **env)
    return fn(rank, world, int(env["MASTER_PORT"]), *args)


def run_local(fn, world: int, args: tuple = (), timeout_s: float = 300.0) -> None:
    """Run ``fn(rank, world, port, *args)`` in ``world`` forked processes; kill them all and raise
    on timeout or on the first failure."""
    import torch.multiprocessing as mp

    with reserve_port() as listener:  # the parent's copy closes once the ranks have theirs
        ctx = mp.start_processes(_rank_main, args=(fn, world, listener, tuple(args)), nprocs=world,
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


def torchrun_local(nproc: int, module: str, argv: list, stop_file: str, env: Optional[dict] = None) -> int:
    """``torchrun --standalone --nproc_per_node=N -m module argv...`` in a child process; returns
    its exit status. The launcher owns the run's lifecycle:

    * SIGTERM / SIGUSR1 / SIGINT to it become a stop request to every rank (``stop_file``, the
      trainer's ``LING_STOP_FILE``): they finish the step, save and exit 0; a second SIGTERM or
      SIGINT ends the ranks at once (torchrun's own shutdown).
    * torchrun runs in its own session (a terminal's Ctrl-C reaches only the launcher, which turns
      it into the stop request) with PR_SET_PDEATHSIG: if the launcher is killed (even ``kill -9``)
      torchrun gets SIGTERM and stops its ranks, which also stop when their parent dies
      (``training.signals.stop_when_parent_dies``). No rank is left behind.
    """
    cmd = [sys.executable, "-m", "megatron_ling.local_launch", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *argv]
    if os.path.exists(stop_file):
        os.remove(stop_file)  # a stale request from an earlier run
    child = subprocess.Popen(cmd, env={**os.environ, **(env or {}), "LING_STOP_FILE": stop_file},
                             start_new_session=True, preexec_fn=lambda: signal_when_parent_dies(signal.SIGTERM))
    requests = []

    def on_signal(signum, frame):
        requests.append(signum)
        if len(requests) == 1:
            with open(stop_file, "w") as f:
                f.write(signal.Signals(signum).name + "\n")
            print(f"ling-train: {signal.Signals(signum).name}: asking the ranks to save and stop "
                  f"(send it again to stop at once)", file=sys.stderr, flush=True)
        elif signum != signal.SIGUSR1:
            os.killpg(child.pid, signal.SIGTERM)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        while True:
            try:
                return child.wait()
            except InterruptedError:  # pragma: no cover - PEP 475 retries wait() itself
                continue
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)


def _torchrun_main(argv: list) -> int:
    """torchrun in this process. A rank that failed on bad input (exit 2) already printed its one
    ``error:`` line: pass its status on quietly; anything else gets one line pointing at the ranks'."""
    from torch.distributed import run as torchrun

    try:
        torchrun.main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # ChildFailedError
        codes = {f.exitcode for f in getattr(e, "failures", {}).values()}
        if codes == {2}:
            return 2
        print(f"error: run failed ({type(e).__name__}); see the worker output above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_torchrun_main(sys.argv[1:]))
