"""Small helpers shared across packages."""
from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` (for a local process-group rendezvous)."""
    s = socket.socket()
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


PR_SET_PDEATHSIG = 1


def signal_when_parent_dies(sig: int) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies, even by ``kill -9``
    (prctl PR_SET_PDEATHSIG; Linux only, elsewhere nothing happens). The local launcher's torchrun
    and the training ranks use it so that no process trains on, orphaned, after its launcher died."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass
