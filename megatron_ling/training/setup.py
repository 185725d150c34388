"""Runtime setup shared by the trainer, the tests and the tools: process groups, model chunks
wrapped in Megatron-Core DDP, the Megatron optimizer and LR schedule, and the schedule hooks."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_ling.models.builder import build_ling_model
from megatron_ling.models.config import LingConfig
from megatron_ling.models.expert_bias import ExpertLoadStats, make_finalize_model_grads, wrap_half_precision
from megatron_ling.models.megatron_config import to_transformer_config
from megatron_ling.models.options import ModelOptions
from megatron_ling.parallel.config import ParallelConfig


def prepare_process(cpu_threads: Optional[int] = None) -> None:
    """Per-process settings before megatron-core is used: compat patches where needed; on the CPU,
    eager mode for megatron's jit_fuser (torch.compile would run inductor codegen in every process)."""
    from megatron_ling import compat

    compat.install()
    if not torch.cuda.is_available():
        import torch._dynamo as dynamo

        dynamo.config.disable = True
        if cpu_threads:
            torch.set_num_threads(cpu_threads)


def _init_group(rank: int, world_size: int, local_rank: int, timeout_s: int, store=None) -> None:
    """The one place torch.distributed is initialised: NCCL on GPUs (this rank's device), gloo on the
    CPU; ``store`` given, or torch's env:// rendezvous."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                         timeout=datetime.timedelta(seconds=timeout_s))


# rank 0's store server of a local launch (utils.rendezvous_env), kept for the life of the group
_rendezvous_server = None
_rendezvous_used = False


def init_distributed(timeout_s: int = 600) -> None:
    """torch.distributed from the launcher's env (RANK, WORLD_SIZE, MASTER_ADDR/PORT). A no-op when
    already initialised.

    * No launcher (no WORLD_SIZE, or a world of 1 with no MASTER_PORT): a 1-rank group on an
      in-process store. There is nobody to meet, so no port: a fixed default port would make two
      such runs on one host (two users, two test suites) fail with EADDRINUSE.
    * A local launch that reserved its port (``LING_RENDEZVOUS_FD``, utils.rendezvous_env): rank 0
      first starts the store server on the reserved socket, then every rank joins by env://.
    * Otherwise (torchrun, Slurm): env:// as the launcher set it up."""
    global _rendezvous_server, _rendezvous_used
    if torch.distributed.is_initialized():
        return
    from megatron_ling.utils import RENDEZVOUS_FD_ENV

    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size == 1 and "MASTER_PORT" not in os.environ:
        _init_group(0, 1, local_rank, timeout_s, store=torch.distributed.HashStore())
        return
    if _rendezvous_used and "TORCHELASTIC_USE_AGENT_STORE" in os.environ:
        # the store server of a local launch lived in rank 0's first group; a second group would
        # wait on a port nobody listens on
        raise RuntimeError("init_distributed: a rank of a local launch (run_local, the test harness) makes one "
                           "process group; launch again for another")
    fd = os.environ.pop(RENDEZVOUS_FD_ENV, None)  # popped: not for this rank's own children
    if fd is not None:
        _rendezvous_used = True
        _rendezvous_server = torch.distributed.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=True,
            timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False, master_listen_fd=int(fd))
    _init_group(rank, world_size, local_rank, timeout_s)


def shutdown_distributed() -> None:
    """Megatron's parallel state and every torch.distributed group, destroyed while the interpreter
    is still whole. Every process that initialised them calls this on every way out (errors
    included): without it gloo's worker threads can still hold work at interpreter finalisation and
    the process aborts ("terminate called without an active exception", SIGABRT) instead of exiting
    with its status (pytorch/pytorch#190489; seen as exit -6 after a one-line error in CI)."""
    global _rendezvous_server
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _rendezvous_server = None


def init_single_process(cpu_threads: Optional[int] = 1) -> None:
    """A 1-rank world in this process for building Megatron modules outside a launcher (the
    converters' verification, the profiler's calibration): per-process settings, then a gloo/NCCL
    group on an in-process store unless one exists."""
    prepare_process(cpu_threads=cpu_threads)
    if not torch.distributed.is_initialized():
        # an explicit store, not RANK/WORLD_SIZE in os.environ: those would outlive the group and
        # make this process (a test run, a notebook) look like rank 0 of a 1-process launch
        _init_group(0, 1, 0, 120, store=torch.distributed.HashStore())


def init_model_parallel(parallel: ParallelConfig, ling: LingConfig, seed: int = 1234) -> None:
    """Megatron parallel state (TP/PP/VPP/EP/ETP/CP groups) for this model, and the model-parallel RNG.

    The embedding group holds the pipeline stages with a copy of the word embedding
    (``parallel.layout.embedding_pp_ranks``): it follows from where the layout puts MTP and from
    ``ling.tie_word_embeddings``, so it is derived here from the same two configs ``build_model``
    builds from (megatron-core's default, first and last pp rank, is wrong for a standalone MTP
    stage and for untied embeddings: tests/test_traps.py)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_ling.parallel import layout

    positions = layout.embedding_pp_ranks(parallel.pipeline_layout, parallel.pp, ling.tie_word_embeddings)

    def get_embedding_ranks(pp_ranks):
        return [pp_ranks[i] for i in positions] if len(pp_ranks) > 1 else [pp_ranks[0]]

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        **parallel.megatron_sizes(),
        order="tp-cp-ep-dp-pp" if not parallel.use_tp_pp_dp_mapping else "tp-cp-ep-pp-dp",
        get_embedding_ranks=get_embedding_ranks,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


@dataclass
class ModelBundle:
    ling: LingConfig
    tf_config: object  # megatron TransformerConfig
    chunks: list  # one per virtual stage, DDP-wrapped when built with ddp=True
    stats: ExpertLoadStats

    @property
    def unwrapped(self) -> list:
        """The GPTModel of each chunk (inside DDP and Float16Module)."""
        out = []
        for c in self.chunks:
            while hasattr(c, "module"):
                c = c.module
            out.append(c)
        return out


def build_model(ling: LingConfig, parallel: ParallelConfig, options: ModelOptions, ddp: bool = True,
                tf_overrides: Optional[dict] = None, init_seed: Optional[int] = None) -> ModelBundle:
    """Every virtual-stage chunk of this rank, optionally wrapped for bf16/fp16 and in Megatron DDP,
    in the parallel state of ``init_model_parallel(parallel, ling)``.

    ``init_seed`` re-seeds the CPU generator before building, so that a layout's initialisation is
    reproducible (layouts still differ from each other; tests load one full set of weights)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    tf_config = to_transformer_config(ling, parallel, options, **(tf_overrides or {}))
    if init_seed is not None:
        torch.manual_seed(init_seed)
    nvp = parallel.virtual_stages
    chunks = [build_ling_model(ling, tf_config, vp_stage=(i if nvp else None)) for i in range(nvp or 1)]
    if torch.cuda.is_available():
        chunks = [c.cuda(torch.cuda.current_device()) for c in chunks]
    if options.precision in ("bf16", "fp16"):
        chunks = [wrap_half_precision(tf_config, c) for c in chunks]
    stats = ExpertLoadStats()
    if ddp:
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=parallel.overlap_grad_reduce,
            overlap_param_gather=parallel.overlap_param_gather,
            use_distributed_optimizer=parallel.distributed_optimizer,
            bucket_size=parallel.bucket_size,
            average_in_collective=False,
        )
        # Megatron-LM: only the first chunk buckets; later chunks' grads are reduced as one bucket.
        chunks = [DistributedDataParallel(tf_config, ddp_config, c, disable_bucketing=(i > 0))
                  for i, c in enumerate(chunks)]
    return ModelBundle(ling=ling, tf_config=tf_config, chunks=chunks, stats=stats)


def build_optimizer(bundle: ModelBundle, parallel: ParallelConfig, options: ModelOptions, lr: float,
                    min_lr: float = 0.0, weight_decay: float = 0.0, adam_beta1: float = 0.9,
                    adam_beta2: float = 0.95, adam_eps: float = 1e-8, clip_grad: float = 1.0):
    """Megatron's optimizer (distributed or not) over the chunks, and the schedule hooks."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    cfg = OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=weight_decay, adam_beta1=adam_beta1,
        adam_beta2=adam_beta2, adam_eps=adam_eps, clip_grad=clip_grad,
        bf16=options.precision == "bf16", fp16=options.precision == "fp16", params_dtype=torch.float32,
        use_distributed_optimizer=parallel.distributed_optimizer,
        loss_scale=None if options.precision == "fp16" else 1.0 if options.precision == "bf16" else None,
    )
    optimizer = get_megatron_optimizer(cfg, bundle.chunks)
    configure_schedule_hooks(bundle, optimizer, parallel, options)
    return optimizer


def configure_schedule_hooks(bundle: ModelBundle, optimizer, parallel: ParallelConfig,
                             options: ModelOptions) -> None:
    """What Megatron-LM's training loop sets on the config for the pipeline schedules."""
    cfg, chunks = bundle.tf_config, bundle.chunks
    one = len(chunks) == 1
    cfg.finalize_model_grads_func = make_finalize_model_grads(options.zero_mean_bias_update, bundle.stats)
    cfg.grad_scale_func = optimizer.scale_loss
    if hasattr(chunks[0], "no_sync"):
        cfg.no_sync_func = chunks[0].no_sync if one else [c.no_sync for c in chunks]
        if parallel.overlap_grad_reduce:
            cfg.grad_sync_func = chunks[0].start_grad_sync if one else [c.start_grad_sync for c in chunks]
        if parallel.overlap_param_gather and parallel.distributed_optimizer:
            cfg.param_sync_func = chunks[0].start_param_sync if one else [c.start_param_sync for c in chunks]


def build_lr_scheduler(optimizer, lr_cfg, opt_cfg, train_iters: int):
    """Megatron-Core's OptimizerParamScheduler, stepped once per iteration.

    wsm / constant: linear warmup then constant LR (Ling's WSM: decay is emulated offline by
    merging checkpoints); cosine / linear: decay to min_lr over decay_iters; wsd: warmup, stable,
    then a final decay over wsd_decay_iters."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    style = {"wsm": "constant", "constant": "constant", "cosine": "cosine", "linear": "linear",
             "wsd": "WSD"}[lr_cfg.schedule]
    decay = lr_cfg.decay_iters or train_iters
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=opt_cfg.lr, min_lr=opt_cfg.min_lr,
        lr_warmup_steps=lr_cfg.warmup_iters, lr_decay_steps=max(decay, lr_cfg.warmup_iters + 1),
        lr_decay_style=style, start_wd=opt_cfg.weight_decay, end_wd=opt_cfg.weight_decay,
        wd_incr_steps=max(train_iters, 1), wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True, override_opt_param_scheduler=False,
        wsd_decay_steps=lr_cfg.wsd_decay_iters, lr_wsd_decay_style=lr_cfg.wsd_decay_style,
    )
