"""Synthetic checkpoints for the converter's tests and benchmark, on megatron_ling.testing ranks.

``save_megatron_checkpoint`` runs N gloo ranks (forked from the test harness's zygote), builds a
Ling model at a parallel layout with megatron-core, gives every replicated 1-D tensor (RMSNorm
weights, expert_bias) deterministic non-trivial values (so a swapped or dropped norm or a zeroed
bias shows up in the logits), and saves it with megatron-core's own ``dist_checkpointing.save``
(torch_dist) in the trainer's layout: ``DIR/iter_NNNNNNN/`` + ``latest_checkpointed_iteration.txt``
written last, the HF config dict under ``ling_config`` in the common state.

``layout_forward`` loads a checkpoint at a parallel layout with megatron's ``dist_checkpointing.load``
and returns rank 0's logits and MTP loss (every rank gets the same tokens; used with EP/DP layouts).
"""
from __future__ import annotations

import os
import zlib

import torch

from megatron_ling.convert.torch_dist import TRACKER, iteration_dir
from megatron_ling.models.config import LingConfig
from megatron_ling.parallel.config import ParallelConfig


def _perturb_replicated(sharded_sd) -> None:
    """Norm weights -> 1 + 0.2*N(0,1), expert_bias -> 0.05*N(0,1), seeded by the global key so
    every rank holding a replica writes the same values."""
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
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_ling.models.builder import build_ling_model
    from megatron_ling.models.megatron_config import to_transformer_config
    from megatron_ling.models.options import ModelOptions

    pc = ParallelConfig(**par)
    nv = pc.vpp if (pc.vpp or 1) > 1 else 1
    ps.initialize_model_parallel(tensor_model_parallel_size=pc.tp, pipeline_model_parallel_size=pc.pp,
                                 virtual_pipeline_model_parallel_size=nv if nv > 1 else None,
                                 expert_model_parallel_size=pc.ep, expert_tensor_parallel_size=pc.expert_tp)
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    cfg = LingConfig.from_hf_dict(cfg_dict)
    tf = to_transformer_config(cfg, pc, ModelOptions(precision=precision))
    chunks = [build_ling_model(cfg, tf, vp_stage=v if nv > 1 else None) for v in range(nv)]
    meta = {"dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}
    sd = {("model" if nv == 1 else f"model{v}"): c.sharded_state_dict(metadata=meta) for v, c in enumerate(chunks)}
    return cfg, chunks, sd


def save_rank(ctx, cfg_dict, par, out, iteration, seed, precision):
    """Rank function (megatron_ling.testing.run_ranks): build, perturb, save."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    cfg, chunks, sd = _build(cfg_dict, par, seed, precision)
    _perturb_replicated(sd)
    sd["ling_config"] = cfg.to_hf_dict()
    sd["iteration"] = iteration
    d = iteration_dir(out, iteration)
    if ctx.rank == 0:
        os.makedirs(d, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(sd, d, sharded_strategy=("torch_dist", 1))
    torch.distributed.barrier()
    if ctx.rank == 0:
        with open(os.path.join(out, TRACKER), "w") as f:
            f.write(str(iteration))
    ps.destroy_model_parallel()
    return sorted(k for k in sd["model" if "model" in sd else "model0"])[:1]


def forward_rank(ctx, ckpt, cfg_dict, par, ids):
    """Rank function: load ``ckpt`` at layout ``par`` (no PP) and run ``ids``; rank 0 returns
    (logits, mtp_loss)."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from megatron_ling.convert.torch_dist import resolve_checkpoint
    from megatron_ling.convert.verify import megatron_forward

    _, chunks, sd = _build(cfg_dict, par, 1)
    loaded = dist_checkpointing.load(sd, resolve_checkpoint(ckpt), strict="raise_all")
    chunks[0].load_state_dict(loaded["model"])
    logits, mtp = megatron_forward(chunks[0], ids)
    ps.destroy_model_parallel()
    return (logits, mtp) if ctx.rank == 0 else None


def save_megatron_checkpoint(cfg: LingConfig, out: str, parallel: dict, world: int, iteration: int = 10,
                             seed: int = 1234, precision: str = "fp32", timeout_s: float = 300) -> str:
    """Save a randomly initialised Ling model with ``world`` gloo ranks at layout ``parallel``
    (ParallelConfig fields). Returns ``out``."""
    from megatron_ling.testing import run_ranks

    ParallelConfig(**parallel).validate(world_size=world)
    os.makedirs(out, exist_ok=True)
    run_ranks(save_rank, world, dict(cfg_dict=cfg.to_hf_dict(), par=parallel, out=os.path.abspath(out),
                                     iteration=iteration, seed=seed, precision=precision), timeout_s=timeout_s)
    return out


def layout_forward(ckpt: str, cfg: LingConfig, parallel: dict, world: int, ids: torch.Tensor,
                   timeout_s: float = 300):
    from megatron_ling.testing import run_ranks

    return run_ranks(forward_rank, world, dict(ckpt=os.path.abspath(ckpt), cfg_dict=cfg.to_hf_dict(),
                                               par=parallel, ids=ids), timeout_s=timeout_s)[0]
