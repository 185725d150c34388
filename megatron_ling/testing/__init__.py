"""Multi-rank test harness (fork-based gloo ranks with hard timeouts) and the parallel-fidelity
scenarios run by tests/test_parallel*.py. See docs/parallelism.md."""
from megatron_ling.testing.harness import (  # noqa: F401
    HarnessError,
    RankContext,
    RankFailure,
    RankTimeout,
    get_zygote,
    run_ranks,
)
