"""Megatron-Core torch_dist checkpoints with the model config and recipe inside.

The directory layout (iteration dirs, tracker, ``.tmp`` -> rename) is ``megatron_ling.checkpoint.layout``'s:
a save goes to ``iter_XXXXXXX.tmp`` and is renamed when every rank is done, so a job killed
during a save leaves the previous checkpoint as the latest complete one. The common state holds
plain types only (loaded with torch.load(weights_only=True)): iteration, consumed_samples,
ling_config (HF config.json dict), recipe, parallel layout, LR scheduler state, version.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from megatron_ling.checkpoint import layout, manifest
from megatron_ling.checkpoint.metadata import read_metadata
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
    _write_manifest(tmp)
    if _rank() == 0:
        layout.commit_save(ckpt_dir, iteration)
        if keep_last:
            layout.prune(ckpt_dir, keep_last, iteration)
    _barrier()
    return layout.iteration_dir(ckpt_dir, iteration)


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _all_gather(obj) -> list:
    if not torch.distributed.is_initialized():
        return [obj]
    out = [None] * _world()
    torch.distributed.all_gather_object(out, obj)
    return out


def _write_manifest(tmp: str) -> None:
    """Every rank hashes its share of the saved files (threads within a rank); rank 0 writes the
    manifest into ``tmp`` before the save is committed. Collective."""
    names = manifest.checkpoint_files(tmp) if _rank() == 0 else None
    if torch.distributed.is_initialized():
        box = [names]
        torch.distributed.broadcast_object_list(box, src=0)
        names = box[0]
    parts = _all_gather(manifest.hash_files(tmp, manifest.share(names, _rank(), _world())))
    if _rank() == 0:
        manifest.write_manifest(tmp, {k: v for part in parts for k, v in part.items()})


def verify_checkpoint(path: str) -> None:
    """The checkpoint's files against its manifest, the files shared over the ranks; the same
    one-line LingConfigError on every rank when one is missing or corrupt. Collective."""
    expected = manifest.read_manifest(path)
    if expected is None:
        if _rank() == 0:
            print(f"note: {path} has no {manifest.MANIFEST} (saved before checksums); loading it unverified",
                  flush=True)
        return
    mine = manifest.share(sorted(expected), _rank(), _world())
    problems = [p for p in _all_gather(manifest.verify(path, mine)) if p]
    if problems:
        raise LingConfigError(problems[0])


def _check_readable(path: str) -> None:
    """A missing common state or an unreadable file is one line here, not a megatron traceback.
    No silent fallback to an older checkpoint: the user decides whether to lose those iterations."""
    if not layout.has_common_state(path):
        raise LingConfigError(f"checkpoint.resume: {path} has no {layout.COMMON_STATE} or common_state object "
                              f"(incomplete copy?); copy it again, or resume from an earlier iter_* directory "
                              f"(checkpoint.resume=PATH)")
    # every file the checkpoint references (its .metadata names each data file), present or not
    needed = {i.relative_path for i in read_metadata(path).storage_data.values()}
    for name in sorted(needed | set(manifest.checkpoint_files(path))):
        if not os.access(os.path.join(path, name), os.R_OK):
            raise LingConfigError(f"checkpoint.resume: {os.path.join(path, name)} is missing or not readable; fix "
                                  f"it, or resume from an earlier iter_* directory (checkpoint.resume=PATH)")


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
                    parallel=None, strict: bool = True, verify_checksums: bool = True) -> dict:
    """Load a checkpoint (root dir or iter dir) into ``bundle`` (+ optimizer, + scheduler).
    Returns its common state. Model weights load at any layout; see _check_optimizer_reshard.
    Before megatron-core opens the directory: its files are checked against the checksum manifest
    (``verify_checksums``), its ``.metadata`` through the allow-list unpickler and its common state
    is read with weights_only=True - megatron's own loader then unpickles only checked files."""
    from megatron.core import dist_checkpointing

    path = layout.resolve(path, field="checkpoint.resume")
    _check_readable(path)
    if verify_checksums:
        verify_checkpoint(path)
    metadata = read_metadata(path)
    common = layout.read_common_state(path)
    has_optimizer = any(k.startswith("optimizer.") for k in metadata.state_dict_metadata)
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
