"""Local rendezvous never races for a port.

CI ran the two megatron-core versions' suites side by side and lost two runs to EADDRINUSE: a
launcher had picked a free port and let it go, and something else took it before rank 0's store
bound it; and a single-process run bound the fixed default 29500 that the other suite's run held.
Now the launchers keep the port reserved until rank 0's store server takes over the very socket
(megatron_ling.utils.reserve_port / rendezvous_env), and a run with no launcher uses no port."""
import errno
import json
import os
import socket
import subprocess
import sys

import pytest

from megatron_ling.local_launch import run_local
from tests.support import probes as P
from tests.support.harness import RankFailure, run_ranks


def test_harness_port_cannot_be_taken_before_the_ranks_meet():
    out = run_ranks(P.port_thief_then_rendezvous, 3, prepare=False, timeout_s=120)
    assert [o["sum"] for o in out] == [6.0] * 3
    assert not any(o["stolen"] for o in out), out  # bound by another socket: the old race


def test_second_group_in_a_local_launch_is_refused_not_a_hang():
    # rank 0's store server went with the first group: a second one would wait on a dead port
    with pytest.raises(RankFailure, match="makes one process group; launch again"):
        run_ranks(P.second_group, 2, timeout_s=120, grace_s=2)


def _thief_rank(rank, world, port, out_dir):
    res = P.port_thief_then_rendezvous(type("Ctx", (), {"rank": rank})())
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(dict(res, port=port), f)


def test_local_launcher_port_cannot_be_taken_before_the_ranks_meet(tmp_path):
    run_local(_thief_rank, 2, (str(tmp_path),), timeout_s=120)
    out = [json.load(open(tmp_path / f"{r}.json")) for r in range(2)]
    assert [o["sum"] for o in out] == [3.0, 3.0] and out[0]["port"] == out[1]["port"]
    assert not any(o["stolen"] for o in out), out


_SINGLE = """
import torch
from megatron_ling.training.setup import init_distributed, shutdown_distributed
init_distributed(timeout_s=30)
t = torch.ones(1)
torch.distributed.all_reduce(t)
print("world", torch.distributed.get_world_size(), "sum", t.item())
shutdown_distributed()
"""


def test_run_without_a_launcher_needs_no_port():
    # hold torch's and megatron's habitual default port: a run without a launcher used to bind it
    busy = socket.socket()
    try:
        busy.bind(("127.0.0.1", 29500))
        busy.listen(1)
    except OSError as e:  # already held by something else on this host: just as good a test
        assert e.errno == errno.EADDRINUSE
    try:
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        r = subprocess.run([sys.executable, "-c", _SINGLE], env=env, capture_output=True, text=True, timeout=120)
    finally:
        busy.close()
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world 1 sum 1.0" in r.stdout
