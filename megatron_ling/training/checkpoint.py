"""Megatron-Core torch_dist checkpoints with the model config and recipe inside.

The directory layout (iteration dirs, tracker, ``.tmp`` -> rename) is ``megatron_ling.checkpoint.layout``'s:
a save goes to ``iter_XXXXXXX.tmp`` and is renamed when every rank is done, so a job killed
during a save leaves the previous checkpoint as the latest complete one. The common state holds
plain types only (loaded with torch.load(weights_only=True)): iteration, consumed_samples,
ling_config (HF config.json dict), recipe, parallel layout, LR scheduler state, version.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_ling.checkpoint import layout
from megatron_ling.errors import LingConfigError
from megatron_ling.version import __version__

CHECKPOINT_FORMAT = 1


def model_sharded_state_dict(bundle) -> dict:
    """The sharded state dict of every model chunk under the keys a checkpoint stores them at
    (``model``, or ``model0``.. with virtual stages); its tensors are the chunks' own."""
    from megatron.core import parallel_state as ps

    # dp_cp_group metadata is required when MTP sits on a non-first pipeline stage
    # (megatron/core/models/gpt/gpt_model.py sharded_state_dict).
    meta = {"dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}
    if len(bundle.chunks) == 1:
        return {"model": bundle.unwrapped[0].sharded_state_dict(metadata=meta)}
    return {f"model{i}": m.sharded_state_dict(metadata=meta) for i, m in enumerate(bundle.unwrapped)}


def _optimizer_metadata() -> dict:
    # fully_reshardable: optimizer state can be loaded at another TP/PP/DP layout.
    return {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def layout_signature(parallel) -> dict:
    return {k: getattr(parallel, k) for k in ("tp", "pp", "vpp", "ep", "etp", "cp", "distributed_optimizer")}


def save_checkpoint(bundle, optimizer, lr_scheduler, ckpt_dir: str, iteration: int, consumed_samples: int,
                    recipe_dict: Optional[dict] = None, parallel=None, keep_last: Optional[int] = None) -> str:
    """Save model (+ optimizer, + scheduler) at ``iteration``. Collective: call on every rank."""
    from megatron.core import dist_checkpointing

    if _rank() == 0:
        layout.begin_save(ckpt_dir, iteration)  # also removes a save that was killed earlier
    _barrier()
    tmp = layout.tmp_dir(layout.iteration_dir(ckpt_dir, iteration))
    state = model_sharded_state_dict(bundle)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=False, metadata=_optimizer_metadata())
    state.update(
        checkpoint_format=CHECKPOINT_FORMAT,
        megatron_ling_version=__version__,
        iteration=int(iteration),
        consumed_samples=int(consumed_samples),
        ling_config=bundle.ling.to_hf_dict(),
        recipe=recipe_dict or {},
        parallel=layout_signature(parallel) if parallel is not None else {},
        opt_param_scheduler=lr_scheduler.state_dict() if lr_scheduler is not None else {},
    )
    dist_checkpointing.save(state, tmp, sharded_strategy=("torch_dist", 1))
    _barrier()
    if _rank() == 0:
        layout.commit_save(ckpt_dir, iteration)
        if keep_last:
            layout.prune(ckpt_dir, keep_last)
    _barrier()
    return layout.iteration_dir(ckpt_dir, iteration)


def _check_optimizer_reshard(saved: dict, parallel) -> None:
    """megatron-core 0.16.1 cannot reshard optimizer state between EP=1 and EP>1 (EP2->EP1:
    KeyError 'optimizer'; EP1->EP2: "Expected 2 entries in state dict, but got 4") nor between the
    distributed and the plain optimizer, so refuse before loading. EP2->EP4 and ETP changes work."""
    if not saved or parallel is None:
        return
    old_do, new_do = saved.get("distributed_optimizer"), parallel.distributed_optimizer
    if old_do is not None and bool(old_do) != bool(new_do):
        raise LingConfigError(
            f"checkpoint.load_optimizer: the checkpoint was saved with parallel.distributed_optimizer={old_do} and "
            f"this run uses {new_do}; megatron-core cannot convert optimizer state between them: set "
            f"checkpoint.load_optimizer=false to load the model weights only")
    old_ep, new_ep = saved.get("ep", 1), parallel.ep
    if (old_ep == 1) != (new_ep == 1):
        raise LingConfigError(
            f"checkpoint.load_optimizer: the checkpoint was saved with ep={old_ep} and this run uses ep={new_ep}; "
            f"megatron-core cannot reshard optimizer state across that change: set checkpoint.load_optimizer=false "
            f"to load the model weights only (the optimizer starts fresh)")


def load_checkpoint(bundle, optimizer, lr_scheduler, path: str, load_optimizer: bool = True,
                    parallel=None, strict: bool = True) -> dict:
    """Load a checkpoint (root dir or iter dir) into ``bundle`` (+ optimizer, + scheduler).
    Returns its common state. Model weights load at any layout; see _check_optimizer_reshard."""
    from megatron.core import dist_checkpointing

    path = layout.resolve(path, field="checkpoint.resume")
    common = layout.read_common_state(path)
    has_optimizer = _has_optimizer_state(path)
    want_optimizer = load_optimizer and optimizer is not None and has_optimizer
    if want_optimizer:
        _check_optimizer_reshard(common.get("parallel") or {}, parallel)
    state = model_sharded_state_dict(bundle)
    if want_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=_optimizer_metadata())
    # raise_unexpected: a requested key absent from the checkpoint is an error; checkpoint keys we do
    # not request ("missing" in megatron's terms, e.g. optimizer state on a weights-only load) are fine.
    # A weights-only checkpoint written by `ling-convert from-hf` holds the _extra_state objects of
    # the local (non-TE) spec; Transformer Engine modules ask for others. Those may be absent (they
    # are recomputed); every tensor must still be there.
    model_only = bool(common.get("model_only"))
    mode = "log_unexpected" if model_only else ("raise_unexpected" if strict else "assume_ok_unexpected")
    loaded = dist_checkpointing.load(state, path, strict=mode)
    if isinstance(loaded, tuple):
        loaded = loaded[0]
    names = ["model"] if len(bundle.chunks) == 1 else [f"model{i}" for i in range(len(bundle.chunks))]
    for name, m in zip(names, bundle.unwrapped):
        result = m.load_state_dict(loaded[name], strict=strict and not model_only)
        absent = [k for k in getattr(result, "missing_keys", []) if not k.endswith("_extra_state")]
        if absent:
            raise LingConfigError(f"checkpoint.resume: {path} lacks {len(absent)} model tensors, e.g. {absent[0]}; "
                                  f"it was saved for another model")
    if want_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
        if lr_scheduler is not None and common.get("opt_param_scheduler"):
            lr_scheduler.load_state_dict(common["opt_param_scheduler"])
    elif optimizer is not None and hasattr(optimizer, "reload_model_params"):
        # fp32 main params (bf16/fp16 training, distributed optimizer) start from the loaded weights.
        optimizer.reload_model_params()
    from megatron_ling.models.expert_bias import assert_fp32_expert_bias

    assert_fp32_expert_bias(bundle.unwrapped)
    common["loaded_optimizer"] = want_optimizer
    return common


def _has_optimizer_state(path: str) -> bool:
    """Whether the checkpoint holds optimizer tensors (a from-hf import holds the model only)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        meta = FileSystemReader(path).read_metadata()
    except Exception:
        return False
    return any(k.startswith("optimizer.") for k in meta.state_dict_metadata)
