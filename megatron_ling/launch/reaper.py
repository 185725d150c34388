"""Run one command per Slurm task and, when it ends, end every process it left behind.

    python -m megatron_ling.launch.reaper -- CMD [ARGS...]

Why: a training process killed hard (SIGKILL, OOM killer) can leave forked helpers behind (e.g.
checkpoint writer processes forked by Megatron's torch_dist strategy). They are re-parented away
from the task, so Slurm setups that track processes by parentage (proctrack/linuxproc) neither see
nor kill them, and because they still hold the task's stdout the step - and the job - never ends.
This wrapper makes itself a child subreaper (prctl PR_SET_CHILD_SUBREAPER): orphans of the
command are re-parented to it instead of init, and once the command exits it sends them SIGTERM,
then SIGKILL, by pid. With proctrack/cgroup Slurm would kill them anyway; this costs nothing there.

SIGUSR1/SIGUSR2 are ignored here and therefore in the command (an ignored disposition survives
exec): a step-level USR1 must not kill torchrun; the training processes install their own handler.
The exit status is the command's (128 + N when a signal N ended it).
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from typing import List

PR_SET_CHILD_SUBREAPER = 36
GRACE_SECONDS = 3.0


def become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux / no prctl: run without the cleanup
        return False


def child_pids(parent: int) -> List[int]:
    """Live children of `parent` (from /proc; zombies excluded, they only need reaping)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may contain spaces and parentheses
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == parent and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def end_leftovers(me: int) -> int:
    """SIGTERM, then SIGKILL, the processes re-parented to us. Returns how many there were."""
    left = child_pids(me)
    if not left:
        reap()
        return 0
    print(f"[ling-slurm reaper] ending {len(left)} process(es) left behind: {left}", file=sys.stderr, flush=True)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + GRACE_SECONDS
        while time.time() < deadline:
            reap()
            left = child_pids(me)
            if not left:
                return len(left)
            time.sleep(0.1)
    reap()
    return len(left)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("usage: python -m megatron_ling.launch.reaper -- CMD [ARGS...]", file=sys.stderr)
        return 2
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    # SIGTERM/SIGINT reach the whole step from Slurm; here they only must not end the wrapper
    # before the command has shut down and its leftovers are cleaned up.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    subreaper = become_subreaper()
    proc = subprocess.Popen(argv)
    rc = proc.wait()
    if subreaper:
        end_leftovers(os.getpid())
    return 128 - rc if rc < 0 else rc


if __name__ == "__main__":
    sys.exit(main())
