"""Small rank functions for the harness's own tests and the weight-mapping tests."""
from __future__ import annotations

import os
import time

import torch

from tests.support import fidelity as F


def allreduce_rank(ctx) -> float:
    t = torch.tensor([ctx.rank + 1.0])
    torch.distributed.all_reduce(t)
    return t.item()


def fail_on_rank(ctx, bad_rank: int = 1) -> int:
    """``bad_rank`` raises; the others wait for it in a collective (until the harness kills them)."""
    if ctx.rank == bad_rank:
        raise ValueError(f"rank {ctx.rank} fails on purpose")
    torch.distributed.barrier()
    return ctx.rank


def hang_on_rank(ctx, bad_rank: int = 0) -> int:
    if ctx.rank == bad_rank:
        time.sleep(3600)
    return ctx.rank


def collective_without_peer(ctx) -> int:
    """Rank 0 waits in an all-reduce that rank 1 never joins: the process-group timeout fires."""
    if ctx.rank == 0:
        torch.distributed.all_reduce(torch.ones(1))
        return 0
    time.sleep(3600)
    return 1


def exit_hard(ctx) -> int:
    if ctx.rank == 1:
        os._exit(3)
    return ctx.rank


def weights_roundtrip(ctx, recipe, parallel: dict, full: dict) -> dict:
    """Load ``full`` into the layout and gather it back (no training)."""
    from tests.support.weights import canonical_names, gather_full_state_dict, unwrap

    bundle = F.start(ctx, recipe, parallel, full).bundle
    back = gather_full_state_dict(bundle.chunks, dst=0)
    local = sorted(v for c in bundle.chunks for v in canonical_names(unwrap(c)).values())
    return dict(full=back, local_names=local)


def load_mismatched(ctx, recipe, parallel: dict, full: dict) -> None:
    """Load a full state dict of another model shape: must raise WeightMappingError."""
    F.start(ctx, recipe, parallel, full)


def port_thief_then_rendezvous(ctx) -> dict:
    """Before the process group exists, try to take the rendezvous port the launcher handed out (as
    another process on the host could), then join the group and all-reduce (prepare=False case)."""
    import errno
    import socket

    import torch

    from megatron_ling.training.setup import init_distributed, shutdown_distributed

    port = int(os.environ["MASTER_PORT"])
    thief = socket.socket()
    try:
        thief.bind(("127.0.0.1", port))
        stolen = True
    except OSError as e:
        stolen = e.errno != errno.EADDRINUSE
    finally:
        thief.close()
    init_distributed(timeout_s=30)
    t = torch.tensor([float(ctx.rank + 1)])
    torch.distributed.all_reduce(t)
    shutdown_distributed()
    return dict(stolen=stolen, sum=float(t.item()))


def second_group(ctx) -> None:
    """A second process group after the first is shut down (a rank of a local launch cannot)."""
    from megatron_ling.training.setup import init_distributed, shutdown_distributed

    shutdown_distributed()
    init_distributed(timeout_s=10)
