"""Small helpers shared across packages."""
from __future__ import annotations

import socket


RENDEZVOUS_FD_ENV = "LING_RENDEZVOUS_FD"


def reserve_port(host: str = "127.0.0.1") -> socket.socket:
    """A listening socket on a free TCP port of ``host``, for a local process-group rendezvous.

    The port stays reserved for as long as the socket is open, so nothing can take it between the
    launcher's choice and the ranks' rendezvous. (Binding port 0, closing it and handing out the
    number loses that race to any other process on the host: another test suite's rendezvous or any
    outgoing connection, which draws from the same ephemeral range; CI saw EADDRINUSE that way.)
    The launcher passes the socket to rank 0, whose store server listens on it
    (:func:`rendezvous_env`, ``training.setup.init_distributed``), and closes its own copy once the
    ranks have started."""
    s = socket.socket()
    s.bind((host, 0))
    s.listen(128)
    return s


def rendezvous_env(listener: socket.socket, rank: int) -> dict:
    """In the process of ``rank``, forked from a local launcher that holds ``listener`` (from
    :func:`reserve_port`): the rendezvous environment for this rank, and the socket handed over.

    It is torchrun's arrangement with rank 0 in place of torchrun's agent: one store server, on the
    reserved socket, run by rank 0 (``LING_RENDEZVOUS_FD``; the fd is inherited through the fork),
    and every rank, rank 0 too, joins it as a client (``TORCHELASTIC_USE_AGENT_STORE``, read by
    torch's env:// rendezvous). Other ranks close their copy of the socket; rank 0 detaches it
    from the Python object, because the store server closes the fd itself when it is destroyed."""
    host, port = listener.getsockname()[:2]
    env = dict(MASTER_ADDR=host, MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    if rank == 0:
        env[RENDEZVOUS_FD_ENV] = str(listener.detach())
    else:
        listener.close()
    return env


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
