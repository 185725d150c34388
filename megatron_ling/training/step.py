"""One training step through Megatron-Core's own pipeline schedules."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import torch


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Masked token loss. Returns (sum, tokens, report) so Megatron's schedule averages per token
    (or, with calculate_per_token_loss, normalises by the global token count in finalize)."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss.detach().clone(), num_tokens.detach().float()])
    return loss, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    """Megatron forward_step_func: every stage reads the same micro-batch dict; GPTModel uses what
    its stage needs (tokens on the first stage and for MTP, labels and loss_mask on the last)."""
    batch = next(data_iterator)
    dev = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    tokens = batch["tokens"].to(dev, non_blocking=True)
    labels = batch["labels"].to(dev, non_blocking=True)
    loss_mask = batch["loss_mask"].to(dev, non_blocking=True)
    position_ids = batch["position_ids"].to(dev, non_blocking=True)
    output = model(tokens, position_ids, attention_mask=None, labels=labels, loss_mask=loss_mask)
    return output, partial(loss_func, loss_mask)


@dataclass
class StepResult:
    lm_loss: float  # mean token loss over the global batch
    grad_norm: Optional[float]
    num_tokens: int
    update_successful: bool
    extra: dict = field(default_factory=dict)  # mtp loss, z loss, ...


def _pp_broadcast_from_last(t: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(),
                                    group=ps.get_pipeline_model_parallel_group())
    return t


def run_forward_backward(bundle, microbatches: list, seq_length: int, micro_batch_size: int,
                         forward_only: bool = False, step_fn: Callable = forward_step):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = bundle.chunks
    iters = [iter(microbatches) for _ in chunks]
    fbf = get_forward_backward_func()
    return fbf(forward_step_func=step_fn, data_iterator=iters if len(chunks) > 1 else iters[0],
               model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(microbatches),
               seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=forward_only)


def reduce_lm_loss(out: list) -> torch.Tensor:
    """[loss sum, tokens] over this rank's micro-batches, summed over data parallel (with CP)
    and sent from the last pipeline stage to every stage."""
    from megatron.core import parallel_state as ps

    t = torch.zeros(2, dtype=torch.float64)
    if out:
        t = torch.stack([d["lm loss"] for d in out]).double().sum(0).cpu()
        torch.distributed.all_reduce(t, group=ps.get_data_parallel_group(with_context_parallel=True))
    return _pp_broadcast_from_last(t)


def aux_losses(bundle, num_microbatches: int) -> dict:
    """MTP loss(es) and MoE z-loss from megatron-core's trackers, on every rank, then cleared.

    The MTP tracker only exists on the pipeline stage that holds the MTP block (Megatron-LM logs
    from the last rank); its DP-averaged values are sent to every stage."""
    from megatron.core.transformer.moe.moe_utils import track_moe_metrics

    from megatron_ling import compat

    cfg = bundle.tf_config
    d: dict = {}
    scale = 1.0 / num_microbatches
    if cfg.mtp_num_layers:
        vals = torch.zeros(cfg.mtp_num_layers, dtype=torch.float32)
        tracked = compat.mtp_tracked_losses(reduce=True)
        if tracked is not None:
            vals = tracked.float().cpu() * scale
            compat.clear_mtp_tracker()
        vals = _pp_broadcast_from_last(vals)
        for i, v in enumerate(vals.tolist()):
            d[f"mtp_{i + 1}_loss"] = v
    if cfg.num_moe_experts and cfg.moe_z_loss_coeff:
        z: dict = {}
        # Routers record into a tracker of num_layers + mtp_num_layers entries (router.py:445).
        # 0.16.1's force_initialize sizes it by the num_layers argument alone (moe_utils.py:995): a
        # stage without MoE layers would all-reduce a shorter tensor over the pipeline group, so it
        # gets the routers' size there; 0.19 adds mtp_num_layers itself (moe_logging.py:187). The
        # mean divides by the MoE layer count computed from moe_layer_freq (+ MTP) as usual.
        n = cfg.num_layers + (0 if compat.mcore_at_least("0.19") else (cfg.mtp_num_layers or 0))
        track_moe_metrics(loss_scale=scale, iteration=0, writer=None, total_loss_dict=z, force_initialize=True,
                          track_names=["z_loss"], num_layers=n, moe_layer_freq=cfg.moe_layer_freq,
                          mtp_num_layers=cfg.mtp_num_layers)
        d.update({k.replace(" ", "_"): float(v) for k, v in z.items()})
    return d


def train_step(bundle, optimizer, microbatches: list, seq_length: int, micro_batch_size: int,
               lr_scheduler=None, step_fn: Callable = forward_step, track_aux: bool = True) -> StepResult:
    """Zero grads, forward+backward over ``microbatches`` with Megatron's schedule (1F1B /
    interleaved / no pipelining), finalize (grad all-reduce, expert-bias update), optimizer step."""
    for c in bundle.chunks:
        if hasattr(c, "zero_grad_buffer"):
            c.zero_grad_buffer()
    optimizer.zero_grad()
    out = run_forward_backward(bundle, microbatches, seq_length, micro_batch_size, step_fn=step_fn)
    ok, grad_norm, _ = optimizer.step()
    if lr_scheduler is not None and ok:
        lr_scheduler.step(increment=1)
    t = reduce_lm_loss(out)
    extra = aux_losses(bundle, len(microbatches)) if track_aux else {}
    return StepResult(lm_loss=float(t[0] / t[1].clamp(min=1)), grad_norm=None if grad_norm is None else float(grad_norm),
                      num_tokens=int(t[1]), update_successful=bool(ok), extra=extra)


@torch.no_grad()
def eval_step(bundle, microbatches: list, seq_length: int, micro_batch_size: int,
              step_fn: Callable = forward_step) -> float:
    for c in bundle.chunks:
        c.eval()
    try:
        out = run_forward_backward(bundle, microbatches, seq_length, micro_batch_size, forward_only=True,
                                   step_fn=step_fn)
    finally:
        for c in bundle.chunks:
            c.train()
    t = reduce_lm_loss(out)
    return float(t[0] / t[1].clamp(min=1))
