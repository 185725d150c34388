"""Rank functions for tests/test_compat.py: minimal real scenarios that show what each
``megatron_ling.compat`` patch prevents (run with the patch left out via the harness's
``compat_exclude``, in forked ranks -- patches are process-global)."""
from __future__ import annotations

import os
import sys

from tests.support import fidelity as F

REEXEC_SCRIPT = """# stands for a training script without an `if __name__ == "__main__":` guard
import os
open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "reexecuted_" + str(os.getpid())), "w").close()
"""


def checkpoint_from_unguarded_script(ctx, recipe, ckpt_dir: str, script_dir: str) -> list:
    """Save a torch_dist checkpoint from a process whose ``__main__`` is a script without a main
    guard; return the files that script left behind, one per time it was executed again."""
    from megatron_ling.training.checkpoint import save_checkpoint

    script = os.path.join(script_dir, "train_unguarded.py")
    if ctx.rank == 0:
        with open(script, "w") as f:
            f.write(REEXEC_SCRIPT)
    import torch

    torch.distributed.barrier()
    sys.modules["__main__"].__file__ = script  # what `python train_unguarded.py` would have
    s = F.start(ctx, recipe, dict(distributed_optimizer=False))
    save_checkpoint(s.bundle, s.optimizer, None, ckpt_dir, 1, consumed_samples=0)
    torch.distributed.barrier()
    return sorted(f for f in os.listdir(script_dir) if f.startswith("reexecuted_"))


def build_only(ctx, recipe, parallel: dict) -> str:
    """Set the layout up without megatron-ling's recipe checks (to show what megatron-core itself
    does with it)."""
    return type(F.start(ctx, recipe, parallel, checks=False).bundle.chunks[0]).__name__


def layout_run_default_embedding_group(ctx, **kw) -> dict:
    """``fidelity.layout_run`` with megatron-core's default embedding group (first and last pp rank,
    ``parallel_state.default_embedding_ranks``) instead of megatron-ling's ``embedding_pp_ranks``:
    shows what an MTP stage off the last rank does without megatron-ling's group."""
    from megatron_ling.parallel import layout

    layout.embedding_pp_ranks = lambda text, pp, tied: [0, pp - 1] if pp > 1 else [0]  # forked rank only
    return F.layout_run(ctx, **kw)
