"""Stop requests: Slurm's warning signal (SIGUSR1), SIGTERM, or a stop file on the shared FS.

A signal handler only sets a flag; the trainer checks it once per step, all ranks agree through an
all-reduce, and then it finishes the step, saves and exits. The stop file (env ``LING_STOP_FILE``)
reaches ranks that never got the signal (torchrun does not forward SIGUSR1 to its workers)."""
from __future__ import annotations

import json
import os
import signal

import torch


class StopRequest:
    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.received: str | None = None
        self.stop_file = os.environ.get("LING_STOP_FILE") or None
        for s in signals:
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        if self.received is not None and signum == signal.SIGTERM:
            # A second SIGTERM (a launcher tearing the job down after another rank died, or an
            # impatient user) means now: this rank may be blocked in a collective forever.
            os._exit(128 + signum)
        self.received = signal.Signals(signum).name

    def local(self) -> bool:
        return self.received is not None or bool(self.stop_file and os.path.exists(self.stop_file))

    def agreed(self) -> bool:
        """True on every rank when any rank was asked to stop (collective)."""
        flag = torch.tensor([1.0 if self.local() else 0.0])
        if torch.distributed.is_initialized():
            if torch.cuda.is_available():
                flag = flag.cuda()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)


def write_exit_status(reason: str, iteration: int) -> None:
    """Rank 0 tells the batch script why the trainer exited (env LING_EXIT_FILE): it requeues the
    job only for 'preempted'."""
    path = os.environ.get("LING_EXIT_FILE")
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps({"reason": reason, "iteration": int(iteration)}) + "\n")
    os.replace(tmp, path)
