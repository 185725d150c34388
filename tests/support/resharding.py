"""Checkpoint resharding scenarios: train at one layout, save (Megatron-Core torch_dist through
``megatron_ling.training.checkpoint``), resume at another layout through the trainer's own
``setup`` (``checkpoint.resume``) and keep training.

Run inside ranks forked by the harness; compared against :func:`fidelity.reference_run` of the same
fidelity case recipe (the uninterrupted single-process run).
"""
from __future__ import annotations

from tests.support import fidelity as F


def save_run(ctx, recipe, parallel: dict, full0: dict, ckpt_dir: str, save_at: int) -> dict:
    """Train ``save_at`` steps from ``full0`` at ``parallel``, save iteration ``save_at`` as the
    trainer does."""
    from megatron_ling.training.checkpoint import save_checkpoint
    from tests.support.weights import gather_full_state_dict

    s = F.start(ctx, recipe, parallel, full0)
    steps = F.train(s, start=0, steps=save_at)
    t = s.recipe.training
    path = save_checkpoint(s.bundle, s.optimizer, s.scheduler, ckpt_dir, save_at,
                           consumed_samples=save_at * t.global_batch_size, recipe_dict=s.recipe.to_dict(),
                           parallel=s.recipe.parallel)
    full = gather_full_state_dict(s.bundle.chunks, dst=0)
    return dict(steps=steps, full=full, path=path)


def resume_run(ctx, recipe, parallel: dict, ckpt_dir: str, start: int, steps: int,
               load_optimizer: bool = True, seed: int = 7) -> dict:
    """Set up ``parallel`` from a different random init (``seed``) resuming from the checkpoint
    (``checkpoint.resume``, ``checkpoint.load_optimizer``), train ``steps`` more."""
    from megatron_ling.training.recipe import recipe_from_dict
    from tests.support.weights import gather_full_state_dict

    d = recipe.to_dict()
    d["model"]["seed"] = seed
    s = F.start(ctx, recipe_from_dict(d), parallel,
                checkpoint=dict(resume=ckpt_dir, load_optimizer=load_optimizer, save=False))
    loaded = gather_full_state_dict(s.bundle.chunks, dst=0)
    out = F.train(s, start=start, steps=steps)
    return dict(iteration=s.iteration, consumed_samples=s.data.consumed_samples,
                loaded_optimizer=s.resumed["loaded_optimizer"], loaded=loaded, steps=out, logits=F.eval_logits(s))
