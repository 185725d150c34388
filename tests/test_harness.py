"""The multi-rank harness: results come back, a failing rank fails the case fast with its
traceback, a hanging rank is killed at the case timeout with its stack, and the process group
times out after pg_timeout_s instead of hanging."""
import time

import pytest

from tests.support.harness import RankFailure, RankTimeout, run_ranks
from tests.support import probes as P

# the wall-time bounds below (grace period vs timeout) need an otherwise idle machine
pytestmark = pytest.mark.quiet


def test_ranks_run_and_return():
    assert run_ranks(P.allreduce_rank, 2) == [3.0, 3.0]
    t = time.monotonic()
    assert run_ranks(P.allreduce_rank, 4) == [10.0] * 4
    print(f"HARNESS 4-rank case wall {time.monotonic() - t:.2f}s")


def test_failing_rank_reports_its_traceback_and_does_not_wait_for_the_others():
    t = time.monotonic()
    with pytest.raises(RankFailure) as e:
        run_ranks(P.fail_on_rank, 2, dict(bad_rank=1), timeout_s=60, grace_s=2)
    msg = str(e.value)
    assert "first rank 1: ValueError: rank 1 fails on purpose" in msg
    assert "Traceback" in msg
    assert time.monotonic() - t < 30  # the grace period, not the 60 s timeout


def test_hanging_rank_is_killed_at_the_case_timeout_with_a_stack_dump():
    t = time.monotonic()
    with pytest.raises(RankTimeout) as e:
        run_ranks(P.hang_on_rank, 2, dict(bad_rank=0), timeout_s=3)
    assert time.monotonic() - t < 20
    assert "in hang_on_rank" in str(e.value)  # faulthandler's stack of the stuck rank


def test_rank_that_dies_without_a_result():
    with pytest.raises(RankFailure, match="rank 1: exited with code 3 without a result"):
        run_ranks(P.exit_hard, 2, timeout_s=30, grace_s=2)


def test_process_group_timeout_fires():
    t = time.monotonic()
    with pytest.raises(RankFailure) as e:
        run_ranks(P.collective_without_peer, 2, pg_timeout_s=3, timeout_s=60, grace_s=1)
    assert "rank 0" in str(e.value)
    assert time.monotonic() - t < 30
