"""Synthetic checkpoints for the converter's tests, on the test harness's ranks.

``save_megatron_checkpoint`` runs N gloo ranks (forked from the test harness's zygote) and builds a
Ling model at a parallel layout with the trainer's own pieces (``training.setup.init_model_parallel``:
TP/PP/VPP/EP/ETP/CP groups, rank order and embedding ranks from the parallel and model configs;
``training.setup.build_model``), gives every replicated 1-D tensor (RMSNorm weights, expert_bias)
deterministic non-trivial values (so a swapped or dropped norm or a zeroed bias shows up in the
logits), and saves it with the trainer's save (``training.checkpoint.save_checkpoint``: the same
directory layout, common state and tracker as a ``ling-train`` checkpoint, without optimizer state).
So the converter is tested on checkpoints the trainer would write, at layouts it would accept.

``layout_forward`` loads a checkpoint at a parallel layout (megatron's ``dist_checkpointing.load``
with ``strict="raise_all"``: exactly the keys the model asks for) and returns rank 0's logits and
MTP loss (every rank gets the same tokens; used with EP/DP layouts).
"""
from __future__ import annotations

import os
import zlib

import torch

from megatron_ling.checkpoint import layout
from megatron_ling.models.config import LingConfig
from megatron_ling.parallel.config import ParallelConfig


def _perturb_replicated(sharded_sd) -> None:
    """Norm weights -> 1 + 0.2*N(0,1), expert_bias -> 0.05*N(0,1), seeded by the global key so
    every rank holding a replica writes the same values. The sharded tensors' data are the
    model's own parameters and buffers, so the model itself changes."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    for sh in nested_values(sharded_sd):
        if not isinstance(sh, ShardedTensor) or sh.data.dim() != 1:
            continue
        g = torch.Generator().manual_seed(zlib.crc32(sh.key.encode()))
        x = torch.randn(sh.global_shape, generator=g)
        with torch.no_grad():
            if sh.key.endswith("expert_bias"):
                sh.data.copy_(0.05 * x)
            else:
                sh.data.copy_(1.0 + 0.2 * x.to(sh.data.dtype))


def _build(cfg_dict: dict, par: dict, seed: int, precision: str = "fp32"):
    """The trainer's parallel state and model chunks (no DDP: nothing is trained)."""
    from megatron_ling.models.options import ModelOptions
    from megatron_ling.training.setup import build_model, init_model_parallel

    pc, cfg = ParallelConfig(**par), LingConfig.from_hf_dict(cfg_dict)
    init_model_parallel(pc, cfg, seed)
    return pc, build_model(cfg, pc, ModelOptions(precision=precision), ddp=False)


def save_rank(ctx, cfg_dict, par, out, iteration, seed, precision):
    """Rank function (tests.support.harness.run_ranks): build, perturb, save as the trainer does."""
    from megatron.core import parallel_state as ps

    from megatron_ling.training.checkpoint import model_sharded_state_dict, save_checkpoint

    pc, bundle = _build(cfg_dict, par, seed, precision)
    _perturb_replicated(model_sharded_state_dict(bundle))
    save_checkpoint(bundle, None, None, out, iteration, consumed_samples=0, parallel=pc)
    ps.destroy_model_parallel()


def forward_rank(ctx, ckpt, cfg_dict, par, ids):
    """Rank function: load ``ckpt`` at layout ``par`` (no PP) and run ``ids``; rank 0 returns
    (logits, mtp_loss)."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from megatron_ling.convert.verify import megatron_forward
    from megatron_ling.training.checkpoint import model_sharded_state_dict

    _, bundle = _build(cfg_dict, par, 1)
    model = bundle.unwrapped[0]
    loaded = dist_checkpointing.load(model_sharded_state_dict(bundle), layout.resolve(ckpt), strict="raise_all")
    model.load_state_dict(loaded["model"])
    logits, mtp = megatron_forward(model, ids)
    ps.destroy_model_parallel()
    return (logits, mtp) if ctx.rank == 0 else None


def save_megatron_checkpoint(cfg: LingConfig, out: str, parallel: dict, world: int, iteration: int = 10,
                             seed: int = 1234, precision: str = "fp32", timeout_s: float = 300) -> str:
    """Save a randomly initialised Ling model with ``world`` gloo ranks at layout ``parallel``
    (ParallelConfig fields). Returns ``out``."""
    from tests.support.harness import run_ranks

    ParallelConfig(**parallel).validate(world_size=world)
    os.makedirs(out, exist_ok=True)
    run_ranks(save_rank, world, dict(cfg_dict=cfg.to_hf_dict(), par=parallel, out=os.path.abspath(out),
                                     iteration=iteration, seed=seed, precision=precision), timeout_s=timeout_s)
    return out


def layout_forward(ckpt: str, cfg: LingConfig, parallel: dict, world: int, ids: torch.Tensor,
                   timeout_s: float = 300):
    from tests.support.harness import run_ranks

    return run_ranks(forward_rank, world, dict(ckpt=os.path.abspath(ckpt), cfg_dict=cfg.to_hf_dict(),
                                               par=parallel, ids=ids), timeout_s=timeout_s)[0]
