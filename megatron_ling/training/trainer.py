"""The training loop (owner): ``setup(recipe) -> Session`` (preflight, process groups, model,
optimizer, schedule, resume state, data) and ``run(session) -> TrainResult`` (steps, logging,
evaluation, checkpoints); ``train(recipe) = run(setup(recipe))``. Drivers that need each step
(the profiler's measured layout runs, ``bench/train_step.py``, the fidelity tests) take
``setup``'s session and call ``Session.step``, the step ``run`` takes."""
from __future__ import annotations

import dataclasses
import math
import os
import re
import signal
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron_ling.errors import LingConfigError
from megatron_ling.training.recipe import Recipe


@dataclass
class TrainResult:
    iteration: int
    losses: list  # (iteration, lm loss) of every logged step
    checkpoint: Optional[str]
    reason: str  # completed | preempted


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def preflight(recipe: Recipe, world_size: int):
    """Everything that can fail on user input, with no process group: recipe checks, data
    (the quick-start corpus is built here once, under a file lock), tokenizer vs vocab, backends."""
    from megatron_ling.data.datasets import resolve_data_config
    from megatron_ling.data.tokenizer import load_tokenizer
    from megatron_ling.models.megatron_config import te_available

    recipe.validate(world_size)
    _check_save_dir(recipe)
    ling = recipe.model.ling_config()
    if recipe.parallel.cp > 1 and not te_available():
        raise LingConfigError("parallel.cp: context parallelism needs Transformer Engine attention on GPUs; set cp: 1")
    data_cfg = resolve_data_config(recipe.data)
    if data_cfg.mock:
        # megatron's synthetic documents need a tokenizer only for eod, pad and its uniqueness key:
        # megatron-core's NullTokenizer over the model's vocabulary (Megatron-LM's choice for mock
        # data), padding with eod as Ling's tokenizer does (pad == eos)
        from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

        tokenizer = NullTokenizer(ling.vocab_size - 1)
        tokenizer.pad = tokenizer.eod
    else:
        tokenizer = load_tokenizer(data_cfg.tokenizer, data_cfg.cache_dir)
        if tokenizer.vocab_size > ling.vocab_size:
            raise LingConfigError(
                f"model.overrides.vocab_size: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                f"vocab_size is {ling.vocab_size}; set model.overrides.vocab_size >= {tokenizer.vocab_size}")
    if data_cfg.format == "chat":
        from megatron_ling.data.packing import check_chat_data

        if recipe.parallel.cp > 1:
            raise LingConfigError("parallel.cp: chat data (packed conversations) does not support context "
                                  "parallelism yet; set cp: 1")
        check_chat_data(data_cfg, tokenizer, recipe.training.seq_length)
    return ling, data_cfg, tokenizer


class TrainingDiverged(LingConfigError):
    """The loss or the gradient norm is NaN/inf: the run stops without saving (Megatron-LM's
    check-for-nan); the last checkpoint written is the newest good state."""


def _check_finite(iteration: int, lm_loss: float, grad_norm: Optional[float], skipped: bool) -> None:
    # lm_loss is reduced over data parallel and broadcast over the pipeline, grad_norm is global:
    # every rank sees the same values and stops at the same step, no extra collective needed.
    bad = [n for n, v in (("lm loss", lm_loss), ("grad norm", None if skipped else grad_norm))
           if v is not None and not math.isfinite(v)]
    if bad:
        raise TrainingDiverged(f"training diverged: {bad[0]} is {lm_loss if bad[0] == 'lm loss' else grad_norm} at "
                               f"iteration {iteration}; stopped without saving it (resume from the last checkpoint "
                               f"with a lower optimizer.lr or check the data)")


def _auto_resume_point(ckpt_dir: str):
    """What ``checkpoint.resume: auto`` loads from ``ckpt_dir``: the tracker's iteration or, with no
    tracker, the newest complete ``iter_*`` (said on stdout). None: a fresh start."""
    from megatron_ling.checkpoint import layout

    if layout.latest_iteration(ckpt_dir) is not None:
        return ckpt_dir
    if layout.list_iterations(ckpt_dir):
        return layout.resolve(ckpt_dir, "checkpoint.dir")
    return None


def _check_save_dir(recipe: Recipe) -> None:
    """Refuse a run whose saves would overwrite (or whose ``keep_last`` would prune by) iterations
    newer than its start: resuming an older iteration, or fine-tuning, into a directory that holds
    a later checkpoint. Megatron-LM users branch into a new ``--save`` directory; so do we."""
    from megatron_ling.checkpoint import layout

    c = recipe.checkpoint
    if not c.save or not layout.list_iterations(recipe.checkpoint_dir):
        return
    src = _auto_resume_point(recipe.checkpoint_dir) if c.resume == "auto" else (None if c.resume == "none" else c.resume)
    start = 0
    if src is not None and not c.finetune:
        d = layout.resolve(src, "checkpoint.resume")
        m = re.match(r"iter_(\d{7})$", os.path.basename(d))
        start = int(m.group(1)) if m else int(layout.read_common_state(d).get("iteration", 0))
    newer = layout.newer_iterations(recipe.checkpoint_dir, start)
    if newer:
        raise LingConfigError(
            f"checkpoint.dir: {recipe.checkpoint_dir} already holds iteration {newer[-1]}, newer than this run's start "
            f"({start}); its saves would overwrite or prune it: set checkpoint.dir (or run_dir) to a new directory "
            f"to branch from an older checkpoint, or remove the newer iter_* directories yourself")


def _resolve_pipeline_layout(recipe: Recipe, ling, world_size: int) -> None:
    par = recipe.parallel
    if par.pipeline_layout != "auto":
        return
    if par.pp == 1:
        par.pipeline_layout = None
        return
    from megatron_ling.pipeline.planner import plan_layout

    par.pipeline_layout = plan_layout(ling, par, recipe.training.seq_length, recipe.training.micro_batch_size,
                                      recipe.num_microbatches(world_size))


def _check_same_model(common: dict, ling) -> None:
    saved = common.get("ling_config")
    if not saved:
        return
    from megatron_ling.models.config import LingConfig

    old = LingConfig.from_hf_dict(saved)
    diffs = [f.name for f in dataclasses.fields(old) if f.name not in ("extra", "eos_token_id", "pad_token_id",
                                                                         "max_position_embeddings", "rope_theta")
             and getattr(old, f.name) != getattr(ling, f.name)]
    if diffs:
        k = diffs[0]
        raise LingConfigError(f"model.overrides.{k}: the checkpoint's model has {k}={getattr(old, k)!r} but this "
                              f"recipe builds {getattr(ling, k)!r}; use the checkpoint's model config")


class _EvalData:
    def __init__(self, dataset, recipe: Recipe, dp_rank: int, dp_size: int):
        self.dataset, self.recipe, self.dp_rank, self.dp_size = dataset, recipe, dp_rank, dp_size

    def batches(self, n_mb: int, start: int) -> list:
        from megatron_ling.data.datasets import get_batch_iterator

        it = get_batch_iterator(self.dataset, self.recipe.training.micro_batch_size, start, self.dp_rank, self.dp_size)
        return [next(it) for _ in range(n_mb)]


@dataclass
class Session:
    """Everything ``run`` needs, built by ``setup``: the model and its optimizer in their process
    groups, the data positioned at the resume point, and where the run resumes."""

    recipe: Recipe
    ling: object  # LingConfig
    world: int
    rank: int
    bundle: object  # setup.ModelBundle
    optimizer: object
    scheduler: object
    data: object  # train micro-batch iterator (counts consumed_samples)
    evaluator: Optional[_EvalData]
    num_microbatches: int
    iteration: int  # the iteration the run resumes after (0: a fresh start)
    resumed: Optional[dict] = None  # common state of the checkpoint loaded (with "loaded_optimizer"), if any
    step_fn: Optional[Callable] = None  # megatron forward_step_func: step.forward_step, or sft.chat_forward_step

    def next_microbatches(self) -> list:
        """This rank's micro-batches of the next global batch."""
        return [next(self.data) for _ in range(self.num_microbatches)]

    def step(self, microbatches: list):
        """One training step (``step.train_step``) of the model, optimizer and LR schedule on
        ``microbatches``, this data-parallel rank's share of a global batch."""
        from megatron_ling.training.step import train_step

        t = self.recipe.training
        return train_step(self.bundle, self.optimizer, microbatches, t.seq_length, t.micro_batch_size,
                          lr_scheduler=self.scheduler, **self._step_fn())

    def _step_fn(self) -> dict:
        return {"step_fn": self.step_fn} if self.step_fn is not None else {}


def setup(recipe: Recipe) -> Session:
    """Preflight, process groups, model, optimizer, LR schedule, resume state and data. Launch
    under torchrun (or any launcher that sets RANK/WORLD_SIZE/MASTER_*)."""
    world = world_size_from_env()
    ling, data_cfg, tokenizer = preflight(recipe, world)
    _resolve_pipeline_layout(recipe, ling, world)

    from megatron_ling.training.setup import (build_lr_scheduler, build_model, build_optimizer,
                                              init_distributed, init_model_parallel, prepare_process)

    from megatron_ling.training.run_lock import hold
    from megatron_ling.utils import signal_when_parent_dies

    if int(os.environ.get("RANK", "0")) == 0:
        hold(recipe.run_dir)  # before any process group: a second run on this dir is one line
    signal_when_parent_dies(signal.SIGTERM)  # orphaned by its launcher: stop like on a preemption
    prepare_process(cpu_threads=int(os.environ.get("LING_CPU_THREADS", "0")) or None)
    init_distributed()
    rank = torch.distributed.get_rank()
    init_model_parallel(recipe.parallel, ling, recipe.model.seed)
    opts = recipe.model.options()
    chat = data_cfg.format == "chat"
    # chat: loss sums / weight sums over the global batch (see training/sft.py)
    bundle = build_model(ling, recipe.parallel, opts, tf_overrides={
        "calculate_per_token_loss": recipe.training.calculate_per_token_loss or chat})
    o = recipe.optimizer
    optimizer = build_optimizer(bundle, recipe.parallel, opts, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                                adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                                clip_grad=o.clip_grad)
    scheduler = build_lr_scheduler(optimizer, recipe.lr, o, recipe.training.train_iters)
    if rank == 0:
        _write_recipe(recipe)
    iteration, consumed, resumed = _resume(recipe, ling, bundle, optimizer, scheduler, rank)
    data, evaluator = _build_data(recipe, data_cfg, tokenizer, consumed)
    step_fn = None
    if chat:
        from megatron_ling.training.sft import chat_forward_step

        step_fn = chat_forward_step
    return Session(recipe=recipe, ling=ling, world=world, rank=rank, bundle=bundle, optimizer=optimizer,
                   scheduler=scheduler, data=data, evaluator=evaluator,
                   num_microbatches=recipe.num_microbatches(world), iteration=iteration, resumed=resumed,
                   step_fn=step_fn)


def _write_recipe(recipe: Recipe) -> None:
    """RUN_DIR/recipe.yaml, the resolved recipe of this run (written whole, then renamed)."""
    os.makedirs(recipe.run_dir, exist_ok=True)
    path = os.path.join(recipe.run_dir, "recipe.yaml")
    with open(path + ".tmp", "w") as f:
        f.write(recipe.to_yaml())
    os.replace(path + ".tmp", path)


def _resume(recipe: Recipe, ling, bundle, optimizer, scheduler, rank: int) -> tuple[int, int]:
    """Load the checkpoint the recipe resumes from, if any; returns (iteration, consumed samples)."""
    from megatron_ling.checkpoint.layout import latest_iteration, read_common_state
    from megatron_ling.training.checkpoint import load_checkpoint

    load_from = None
    if recipe.checkpoint.resume == "auto":
        load_from = _auto_resume_point(recipe.checkpoint_dir)
        if load_from and latest_iteration(recipe.checkpoint_dir) is None and rank == 0:
            print(f"warning: {recipe.checkpoint_dir} has no tracker; resuming from its newest complete checkpoint "
                  f"{load_from}", flush=True)
    elif recipe.checkpoint.resume != "none":
        load_from = recipe.checkpoint.resume
    if not load_from:
        return 0, 0, None
    _check_same_model(read_common_state(load_from), ling)
    finetune = recipe.checkpoint.finetune
    common = load_checkpoint(bundle, optimizer, scheduler, load_from,
                             load_optimizer=recipe.checkpoint.load_optimizer and not finetune,
                             parallel=recipe.parallel, verify_checksums=recipe.checkpoint.verify_checksums)
    iteration, consumed = 0, 0
    if not finetune:
        iteration, consumed = int(common.get("iteration", 0)), int(common.get("consumed_samples", 0))
        if not common["loaded_optimizer"]:
            scheduler.num_steps = iteration  # LR continues; optimizer moments start fresh
    if rank == 0:
        print(f"loaded checkpoint {load_from} (iteration {common.get('iteration')}"
              f"{', weights only' if not common['loaded_optimizer'] else ''}); starting at iteration {iteration}",
              flush=True)
    return iteration, consumed, common


def _build_data(recipe: Recipe, data_cfg, tokenizer, consumed: int):
    """This data-parallel rank's train iterator from ``consumed`` samples on, and the evaluator."""
    from megatron.core import parallel_state as ps

    from megatron_ling.data.datasets import build_datasets, get_batch_iterator
    from megatron_ling.data.packing import build_chat_datasets

    t = recipe.training
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    n_eval = 0
    if t.eval_interval:
        n_eval = (t.train_iters // t.eval_interval + 1) * t.eval_iters * t.global_batch_size
    train_ds, valid_ds, _ = (build_chat_datasets if data_cfg.format == "chat" else build_datasets)(
        data_cfg, tokenizer, t.seq_length, (t.train_iters * t.global_batch_size, n_eval or None, None))
    data = get_batch_iterator(train_ds, t.micro_batch_size, consumed, dp_rank, dp_size, data_cfg.num_workers)
    evaluator = _EvalData(valid_ds, recipe, dp_rank, dp_size) if (t.eval_interval and valid_ds is not None) else None
    return data, evaluator


def pipeline_profiler(session: Session):
    """The recorder of the recipe's ``profiling`` steps, its profile ``meta`` from the session."""
    from megatron_ling.pipeline.profile import profile_meta
    from megatron_ling.training.profiler import PipelineProfiler

    recipe = session.recipe
    t, par = recipe.training, recipe.parallel
    return PipelineProfiler(recipe.profiling, recipe.run_dir, meta=profile_meta(
        session.ling.to_hf_dict(), par.pipeline_layout, par.pp, par.vpp, t.seq_length, t.micro_batch_size,
        session.num_microbatches, recipe=recipe.to_dict()))


def run(session: Session) -> TrainResult:
    """The training loop: step, log, evaluate, save on interval / preemption / at the end."""
    from megatron.core import parallel_state as ps

    from megatron_ling.training.checkpoint import save_checkpoint
    from megatron_ling.training.metrics import MetricsLogger, gather_moe_stats, memory_gib
    from megatron_ling.training.signals import StopRequest, write_exit_status
    from megatron_ling.training.step import eval_step

    s, recipe = session, session.recipe
    t, par, rank, nmb = recipe.training, recipe.parallel, session.rank, session.num_microbatches
    bundle, optimizer, scheduler, data = s.bundle, s.optimizer, s.scheduler, s.data
    recipe_dict = recipe.to_dict()
    profiler = pipeline_profiler(s)
    logger = MetricsLogger(rank, recipe.tensorboard_dir, recipe.metrics_file, t.train_iters)
    from megatron_ling.training.throughput import ThroughputMeter

    meter = ThroughputMeter(s.ling, recipe, s.world)
    stop = StopRequest()
    losses, last_saved, reason = [], None, "completed"
    interval = recipe.checkpoint.interval
    if rank == 0:
        n = sum(p.numel() for c in bundle.unwrapped for p in c.parameters())
        print(f"megatron-ling: {recipe.model.preset or recipe.model.hf_config} | world {s.world} "
              f"(tp {par.tp} pp {par.pp} vpp {par.vpp} ep {par.ep} dp {ps.get_data_parallel_world_size()}) | "
              f"{nmb} microbatches x {t.micro_batch_size} x {t.seq_length} tokens | rank-0 params {n:,}", flush=True)

    def save(it):
        nonlocal last_saved
        if recipe.checkpoint.save:
            last_saved = save_checkpoint(bundle, optimizer, scheduler, recipe.checkpoint_dir, it,
                                         data.consumed_samples, recipe_dict, par, recipe.checkpoint.keep_last)

    iteration = start_iteration = s.iteration
    try:
        while iteration < t.train_iters:
            t0 = time.time()
            mbs = s.next_microbatches()
            with profiler.step(iteration + 1, bundle.chunks):
                r = s.step(mbs)
            iteration += 1
            _check_finite(iteration, r.lm_loss, r.grad_norm, not r.update_successful)
            dt = time.time() - t0
            if iteration % recipe.logging.log_interval == 0 or iteration == 1 or iteration == t.train_iters:
                scalars = {"lm_loss": r.lm_loss, **r.extra, "lr": scheduler.get_lr(optimizer.param_groups[0]),
                           "grad_norm": r.grad_norm, "tokens_per_s": t.global_batch_size * t.seq_length / dt,
                           "step_time_s": dt, **meter.scalars(dt), "consumed_samples": data.consumed_samples,
                           **memory_gib()}
                moe = gather_moe_stats(bundle.stats) if recipe.logging.per_layer_moe_stats else None
                logger.log(iteration, scalars, moe)
                losses.append((iteration, r.lm_loss))
            if s.evaluator is not None and iteration % t.eval_interval == 0:
                ev = eval_step(bundle, s.evaluator.batches(nmb * t.eval_iters, 0), t.seq_length, t.micro_batch_size,
                               **s._step_fn())
                logger.log(iteration, {"eval_lm_loss": ev})
            if stop.agreed():
                reason = "preempted"
                save(iteration)
                if rank == 0:
                    print(f"stopped: preempted ({stop.received or 'stop file'}); saved iteration {iteration}",
                          flush=True)
                break
            if interval and iteration % interval == 0 and iteration < t.train_iters:
                save(iteration)
        else:
            if iteration > start_iteration:  # nothing new to save when resuming a finished run
                save(iteration)
    except BaseException:
        if rank == 0:
            write_exit_status("failed", iteration)
        raise
    finally:
        logger.close()
    if rank == 0:
        write_exit_status(reason, iteration)
        if recipe.checkpoint.save:
            print(f"checkpoint: {last_saved}", flush=True)
        print(f"tensorboard: {recipe.tensorboard_dir}\nmetrics: {recipe.metrics_file}", flush=True)
    return TrainResult(iteration=iteration, losses=losses, checkpoint=last_saved, reason=reason)


def train(recipe: Recipe) -> TrainResult:
    """Run a recipe: ``run(setup(recipe))``; the process groups are torn down on every way out."""
    from megatron_ling.training.setup import shutdown_distributed

    try:
        return run(setup(recipe))
    finally:
        shutdown_distributed()
