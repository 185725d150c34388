"""One run per run directory: an exclusive ``fcntl`` lock on ``RUN_DIR/.lock``, held for the whole
run by the process that starts it (the ``ling-train --nproc-per-node`` launcher, or rank 0 when
torchrun / srun start the ranks). A second run on the same directory stops with one ``error:`` line
before it starts any process; the lock goes away with its holder, even after ``kill -9``.

POSIX record locks (``lockf``) rather than ``flock``: they also hold on NFS and Lustre. They belong
to a process, so the launcher tells its ranks through ``HELD_ENV`` that the run is already locked.
"""
from __future__ import annotations

import fcntl
import os
import socket

from megatron_ling.errors import LingConfigError

LOCK_FILE = ".lock"
HELD_ENV = "LING_RUN_LOCK_HELD"  # the run dir the parent process holds the lock of
_held: dict = {}  # run dir -> open lock file, kept for the life of the process


def hold(run_dir: str) -> None:
    """Take the lock on ``run_dir`` for the rest of this process (no-op when this process or the
    launcher that started it already holds it). Raises LingConfigError if another run holds it."""
    run_dir = os.path.abspath(run_dir)
    if run_dir in _held or os.environ.get(HELD_ENV) == run_dir:
        return
    os.makedirs(run_dir, exist_ok=True)
    f = open(os.path.join(run_dir, LOCK_FILE), "a+")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise LingConfigError(f"run_dir: {run_dir} is in use by another ling-train run ({holder}); wait for it to "
                              f"end or choose another run_dir") from None
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _held[run_dir] = f


def child_env(run_dir: str) -> dict:
    """Environment for the ranks a launcher holding the lock starts."""
    return {HELD_ENV: os.path.abspath(run_dir)}
