"""Checkpoint resharding scenarios: train at one layout, save (Megatron-Core torch_dist through
``megatron_ling.training.checkpoint``), resume at another layout and keep training.

Run inside ranks forked by the harness; compared against :func:`fidelity.reference_run` of the same
:class:`fidelity.Scenario` (the uninterrupted single-process run).
"""
from __future__ import annotations

from typing import Optional

from megatron_ling.testing import fidelity as F


def save_run(ctx, scenario: F.Scenario, parallel: dict, full0: dict, ckpt_dir: str, save_at: int) -> dict:
    """Train ``save_at`` steps from ``full0`` at ``parallel``, save iteration ``save_at``."""
    from megatron_ling.parallel.config import ParallelConfig
    from megatron_ling.parallel.weights import gather_full_state_dict
    from megatron_ling.training.checkpoint import save_checkpoint

    sc = scenario
    vocab = sc.ling().vocab_size
    bundle, optimizer, par = F.build(sc, parallel, full0)
    steps = F._train(bundle, optimizer, sc, vocab, start=0, steps=save_at)
    path = save_checkpoint(bundle, optimizer, None, ckpt_dir, save_at,
                           consumed_samples=save_at * sc.global_microbatches * sc.micro_batch_size,
                           parallel=ParallelConfig(**parallel))
    full = gather_full_state_dict(bundle.chunks, dst=0)
    return dict(steps=steps, full=full, path=path)


def resume_run(ctx, scenario: F.Scenario, parallel: dict, ckpt_dir: str, start: int, steps: int,
               load_optimizer: bool = True, tell_layout: bool = True, init_seed: Optional[int] = 7) -> dict:
    """Build ``parallel`` from a different random init, load the checkpoint, train ``steps`` more.
    ``tell_layout=False`` hides the new layout from load_checkpoint (so megatron-core's own
    behaviour on an unsupported optimizer reshard shows)."""
    import dataclasses

    from megatron_ling.parallel.weights import gather_full_state_dict
    from megatron_ling.training.checkpoint import load_checkpoint

    sc = dataclasses.replace(scenario, init_seed=init_seed)
    vocab = sc.ling().vocab_size
    bundle, optimizer, par = F.build(sc, parallel)
    common = load_checkpoint(bundle, optimizer, None, ckpt_dir, load_optimizer=load_optimizer,
                             parallel=par if tell_layout else None)
    loaded = gather_full_state_dict(bundle.chunks, dst=0)
    out = F._train(bundle, optimizer, sc, vocab, start=start, steps=steps)
    logits = F.eval_logits(bundle, sc, vocab)
    return dict(iteration=common.get("iteration"), consumed_samples=common.get("consumed_samples"),
                loaded_optimizer=common.get("loaded_optimizer"), loaded=loaded, steps=out, logits=logits)
