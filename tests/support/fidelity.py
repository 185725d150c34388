"""Parallel-fidelity scenarios: train a tiny Ling model for a few steps under a parallel layout and
record what must not depend on the layout (run inside ranks forked by the harness).

A case is a training :class:`Recipe` (:func:`case`); every run goes through the trainer's own
``setup`` and ``Session.step`` (``megatron_ling.training.trainer``), i.e. what ``ling-train``
runs, so the tests check the real wiring. What to compare stays here.

* :func:`reference_run` (1 rank): builds the model, records the initial full weights, the logits of
  a fixed evaluation batch before and after training, per-step loss / grad norm / MTP loss, and the
  final full weights and expert biases.
* :func:`layout_run` (N ranks): builds the layout, loads the reference's initial full weights
  (layouts do not reproduce one initialisation), trains on the same global batches -- each data
  parallel rank gets its share of every global batch, as in real training -- and records the same
  things. :func:`compare` turns the two records into max differences.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_ling.data.random_batches import random_microbatch
from megatron_ling.training.recipe import Recipe, recipe_from_dict

EVAL_SEED = 99_000  # the fixed evaluation batch's seeds (far from every step's)


def case(steps: int = 3, precision: str = "fp32", options: Optional[dict] = None, seed: int = 42) -> Recipe:
    """A fidelity case: the recipe shared by the reference and every layout. ling-tiny, ``steps``
    global batches of 4 micro-batches x 2 x 32 tokens (each data-parallel rank runs its share),
    Adam at a constant lr of 1e-3 without weight decay, ``seed`` for the initialisation,
    ``options``: ModelOptions fields. ``data.mock`` spares setup a corpus; the steps use the random
    batches of :func:`global_batch`."""
    return recipe_from_dict(dict(
        model=dict(preset="ling-tiny", precision=precision, seed=seed, **(options or {})),
        training=dict(train_iters=steps, micro_batch_size=2, global_batch_size=8, seq_length=32),
        optimizer=dict(lr=1e-3, min_lr=1e-3, weight_decay=0.0, clip_grad=1.0),
        lr=dict(schedule="constant"), data=dict(mock=True), checkpoint=dict(resume="none")))


def at_layout(recipe: Recipe, parallel: dict, **sections) -> Recipe:
    """``recipe`` with ``parallel`` (ParallelConfig fields) and other sections replaced
    (e.g. ``checkpoint=dict(...)``)."""
    return recipe_from_dict({**recipe.to_dict(), "parallel": dict(parallel), **sections})


def global_batch(recipe: Recipe, step: int, vocab: int) -> list:
    t = recipe.training
    return [random_microbatch(100 * step + i, t.micro_batch_size, t.seq_length, vocab)
            for i in range(t.global_batch_size // t.micro_batch_size)]


def eval_batch(recipe: Recipe, vocab: int) -> list:
    """Fixed evaluation micro-batches (the same on every data-parallel rank)."""
    t = recipe.training
    return [random_microbatch(EVAL_SEED + i, t.micro_batch_size, t.seq_length, vocab)
            for i in range(4)]  # 4: interleaved schedules need at least pp micro-batches


def dp_share(mbs: list) -> list:
    """This data-parallel rank's contiguous share of a global batch's micro-batches."""
    from megatron.core import parallel_state as ps

    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    if len(mbs) % dp:
        raise ValueError(f"{len(mbs)} micro-batches do not split over data parallel size {dp}")
    n = len(mbs) // dp
    return mbs[r * n:(r + 1) * n]


def _clear_trackers() -> None:
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    from megatron_ling import compat

    compat.clear_mtp_tracker()
    clear_aux_losses_tracker()


@torch.no_grad()
def eval_logits(session) -> Optional[torch.Tensor]:
    """Logits of every output-layer call (MTP heads and the main head, per micro-batch) of a
    forward-only pass over the fixed evaluation batch, full vocabulary, fp32, [n, s, b, V]; None on
    ranks without the output layer."""
    from megatron.core import parallel_state as ps

    from megatron_ling.training.step import run_forward_backward
    from tests.support.weights import unwrap

    bundle, t = session.bundle, session.recipe.training
    captured, hooks = [], []
    for c in bundle.chunks:
        m = unwrap(c)
        if getattr(m, "post_process", False) and getattr(m, "output_layer", None) is not None:
            hooks.append(m.output_layer.register_forward_hook(lambda mod, i, o: captured.append(o[0].detach())))
    for c in bundle.chunks:
        c.eval()
    try:
        run_forward_backward(bundle, eval_batch(session.recipe, session.ling.vocab_size), t.seq_length,
                             t.micro_batch_size, forward_only=True)
    finally:
        for c in bundle.chunks:
            c.train()
        for h in hooks:
            h.remove()
        _clear_trackers()
    if not captured:
        return None
    logits = torch.stack(captured).float()
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        torch.distributed.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    return logits


def _bias_dtypes(bundle) -> list:
    from megatron_ling.models.expert_bias import routers

    return sorted({str(r.expert_bias.dtype) for r in routers(bundle.chunks)})


def train(session, start: int = 0, steps: Optional[int] = None) -> list:
    """``steps`` (default: the recipe's train_iters) trainer steps (``Session.step``) on global
    batches ``start``, ``start + 1``, ...; per step: loss, grad norm, MTP loss, tokens, success."""
    out = []
    for s in range(start, start + (session.recipe.training.train_iters if steps is None else steps)):
        r = session.step(dp_share(global_batch(session.recipe, s, session.ling.vocab_size)))
        out.append(dict(loss=r.lm_loss, grad_norm=r.grad_norm, mtp=r.extra.get("mtp_1_loss"),
                        tokens=r.num_tokens, ok=r.update_successful))
    return out


def _skip_recipe_checks() -> None:
    """Let ``setup`` build what megatron-ling's recipe checks refuse, to show what megatron-core
    itself does with it (forked ranks only: this replaces ``Recipe.validate`` for the process)."""
    Recipe.validate = lambda self, world_size=None: self


def start(ctx, recipe: Recipe, parallel: dict, full: Optional[dict] = None, checks: bool = True, **sections):
    """The trainer's ``setup`` of ``recipe`` at ``parallel`` (run files in this harness call's
    temporary log directory), with the full weights ``full`` loaded (and the optimizer's main
    parameters refreshed from them) in place of the random initialisation."""
    import os

    from megatron_ling.training.trainer import setup
    from tests.support.weights import load_full_state_dict

    if not checks:
        _skip_recipe_checks()
    r = at_layout(recipe, parallel, **sections)
    r.run_dir = os.path.join(os.path.dirname(ctx.log_path), "run")
    session = setup(r)
    if full is not None:
        load_full_state_dict(session.bundle.chunks, full)
        session.optimizer.reload_model_params()
    return session


def reference_run(ctx, recipe: Recipe) -> dict:
    """Single-process run (world 1)."""
    from tests.support.weights import gather_full_state_dict

    session = start(ctx, recipe, dict(distributed_optimizer=False))
    full0 = gather_full_state_dict(session.bundle.chunks)
    logits0 = eval_logits(session)
    steps = train(session)
    return dict(full0=full0, logits0=logits0, steps=steps, logits=eval_logits(session),
                full=gather_full_state_dict(session.bundle.chunks), bias_dtypes=_bias_dtypes(session.bundle))


_REFERENCES: dict = {}


def reference(recipe: Recipe, timeout_s: float = 300) -> dict:
    """The single-process run of ``recipe`` (computed once per calling process, in a forked rank)."""
    from tests.support.harness import run_ranks

    key = recipe.to_yaml()
    if key not in _REFERENCES:
        _REFERENCES[key] = run_ranks(reference_run, 1, dict(recipe=recipe), timeout_s=timeout_s)[0]
    return _REFERENCES[key]


def layout_run(ctx, recipe: Recipe, parallel: dict, full0: dict, checks: bool = True,
               steps: Optional[int] = None, gather: bool = True) -> dict:
    """One rank of a parallel layout, from the reference's initial weights ``full0``; ``steps``:
    how many of the recipe's steps to train (default all)."""
    from megatron.core import parallel_state as ps

    from tests.support.weights import gather_full_state_dict, unwrap

    session = start(ctx, recipe, parallel, full0, checks=checks)
    bundle = session.bundle
    logits0 = eval_logits(session)
    out = train(session, steps=steps)
    logits = eval_logits(session)
    full = gather_full_state_dict(bundle.chunks, dst=0) if gather else None
    return dict(rank=ctx.rank, logits0=logits0, logits=logits, steps=out, full=full,
                bias_dtypes=_bias_dtypes(bundle),
                groups=dict(tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
                            dp=ps.get_data_parallel_world_size(), ep=ps.get_expert_model_parallel_world_size(),
                            etp=ps.get_expert_tensor_parallel_world_size()),
                layers=[[l.layer_number for l in getattr(getattr(c, "decoder", None), "layers", [])]
                        for c in map(unwrap, bundle.chunks)],
                mtp=[bool(getattr(unwrap(c), "mtp_process", False)) for c in bundle.chunks])


# ------------------------------------------------------------------------------ comparison
def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def compare(ref: dict, ranks: list) -> dict:
    """Max differences of a layout run (the per-rank results) against the reference:
    logits (abs, over every rank that holds the output layer), per-step loss / grad norm / MTP
    loss (relative, every rank), final full weights (abs)."""
    d = dict(logits0=0.0, logits=0.0, loss=0.0, grad_norm=0.0, mtp=0.0, expert_bias=0.0, weights=0.0, weights_key=None,
             n_logit_ranks=0, tokens_ok=True)
    for r in ranks:
        if r["logits"] is not None:
            d["n_logit_ranks"] += 1
            for k in ("logits0", "logits"):
                if r[k].shape != ref[k].shape:
                    raise AssertionError(f"{k}: shape {tuple(r[k].shape)} vs reference {tuple(ref[k].shape)}")
                d[k] = max(d[k], (r[k] - ref[k]).abs().max().item())
        if len(r["steps"]) != len(ref["steps"]):
            raise AssertionError(f"{len(r['steps'])} steps vs {len(ref['steps'])}")
        for a, b in zip(r["steps"], ref["steps"]):
            d["loss"] = max(d["loss"], rel(a["loss"], b["loss"]))
            d["grad_norm"] = max(d["grad_norm"], rel(a["grad_norm"], b["grad_norm"]))
            if b["mtp"] is not None:
                d["mtp"] = max(d["mtp"], rel(a["mtp"], b["mtp"]))
            d["tokens_ok"] &= a["tokens"] == b["tokens"] and a["ok"]
    full = ranks[0].get("full")
    if full is not None:
        if set(full) != set(ref["full"]):
            raise AssertionError(f"gathered names differ: {sorted(set(full) ^ set(ref['full']))[:5]}")
        for k, v in full.items():
            diff = (v.float() - ref["full"][k].float()).abs().max().item()
            if k.endswith("expert_bias"):
                d["expert_bias"] = max(d["expert_bias"], diff)
            if diff >= d["weights"]:
                d["weights"], d["weights_key"] = diff, k
    return d


def mtp_loss_check(ctx, recipe: Recipe, parallel: dict) -> dict:
    """One trainer step; returns the MTP loss megatron-ling logged and the one recomputed here from
    the MTP heads' own logits (output-layer calls captured on the stage holding the output layer).

    Independent of megatron-core's loss code: MTP layer k predicts the label k+1 positions further
    on, so its loss per micro-batch is the cross entropy against labels shifted left by k+1, over the
    positions whose shifted loss mask is set, averaged over those positions; the logged value is the
    mean over micro-batches (one data-parallel rank here)."""
    import torch.nn.functional as Fn

    from tests.support.weights import unwrap

    session = start(ctx, recipe, parallel)
    bundle, seq = session.bundle, recipe.training.seq_length
    m_layers = bundle.tf_config.mtp_num_layers
    calls, hooks = [], []
    for c in bundle.chunks:
        m = unwrap(c)
        if getattr(m, "post_process", False) and getattr(m, "output_layer", None) is not None:
            # clone: megatron's vocab-parallel cross entropy works in place on the logits
            hooks.append(m.output_layer.register_forward_hook(lambda mod, i, o: calls.append(o[0].detach().clone())))
    mbs = dp_share(global_batch(recipe, 0, session.ling.vocab_size))
    r = session.step(mbs)
    for h in hooks:
        h.remove()
    logged = [r.extra[f"mtp_{k + 1}_loss"] for k in range(m_layers)]
    if not calls:
        return dict(logged=logged, recomputed=None)
    assert len(calls) == len(mbs) * (1 + m_layers), (len(calls), len(mbs), m_layers)
    recomputed = [0.0] * m_layers
    for i, mb in enumerate(mbs):
        per_mb = calls[i * (1 + m_layers):(i + 1) * (1 + m_layers)]  # MTP heads first, then the main head
        for k in range(m_layers):
            shift = k + 1
            logits = per_mb[k].transpose(0, 1).double()[:, : seq - shift]  # [b, s-shift, V]
            labels = mb["labels"][:, shift:]
            mask = mb["loss_mask"][:, shift:].double()
            ce = Fn.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
            recomputed[k] += float((ce * mask.reshape(-1)).sum() / mask.sum()) / len(mbs)
    return dict(logged=logged, recomputed=recomputed)
