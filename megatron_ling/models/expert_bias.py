"""Ling's aux-loss-free load balancing: the zero-mean expert-bias update, and keeping the bias fp32.

Megatron-Core updates the router's selection bias with b += u * sign(mean(e) - e) (moe_utils.py
get_updated_expert_bias). Ling uses the zero-mean variant (FACTS §2)

    s = sign(mean(e) - e);   b += u * (s - mean(s))

so the biases keep summing to the same value (no drift of all experts together). Both run once per
global batch on token counts summed over the TP x CP x DP group, before the optimizer step.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


def zero_mean_bias_update(tokens_per_expert: torch.Tensor, expert_bias: torch.Tensor, rate: float) -> torch.Tensor:
    """New expert bias for token counts ``tokens_per_expert`` [..., E] (already summed over ranks)."""
    e = tokens_per_expert.float()
    s = torch.sign(e.mean(dim=-1, keepdim=True) - e)
    return expert_bias.float() + rate * (s - s.mean(dim=-1, keepdim=True))


def routers(model_chunks) -> list:
    """Megatron routers that carry an expert bias, in model order (chunk by chunk)."""
    out = []
    for chunk in model_chunks:
        for m in chunk.modules():
            if getattr(m, "expert_bias", None) is not None and hasattr(m, "local_tokens_per_expert"):
                out.append(m)
    return out


class ExpertLoadStats:
    """Global tokens per expert of every MoE layer for the last global batch (for logging)."""

    def __init__(self):
        self.tokens: Optional[torch.Tensor] = None  # [n_routers_on_this_stage, E]
        self.layer_ids: list[str] = []
        self.bias: Optional[torch.Tensor] = None

    def imbalance(self) -> Optional[torch.Tensor]:
        """max / mean tokens per expert, per MoE layer (1.0 = perfectly balanced)."""
        if self.tokens is None:
            return None
        t = self.tokens.float()
        return t.max(dim=-1).values / t.mean(dim=-1).clamp(min=1e-9)

    def bias_spread(self) -> Optional[torch.Tensor]:
        if self.bias is None:
            return None
        return self.bias.max(dim=-1).values - self.bias.min(dim=-1).values


def _router_name(r) -> str:
    """``layer<N>`` with N the 1-based global layer number, MTP layer j being N = num_layers + j.
    megatron-core 0.19 numbers MTP inner layers from 1 (transformer_layer.py:343) and marks their
    routers ``is_mtp_layer``; its own aux-loss tracker adds num_layers back (router.py:591), as here,
    so MTP never shares a name with decoder layer j. 0.16 gives MTP the global number already."""
    layer = getattr(r, "layer_number", None)
    if layer is None:
        return "router"
    if getattr(r, "is_mtp_layer", False):
        layer += r.config.num_layers
    return f"layer{layer}"


def make_finalize_model_grads(zero_mean: bool, stats: Optional[ExpertLoadStats] = None,
                              megatron_finalize: Optional[Callable] = None) -> Callable:
    """A ``config.finalize_model_grads_func`` that records expert load and, when ``zero_mean``,
    applies Ling's zero-mean bias update, then runs Megatron-Core's own finalize_model_grads.

    Megatron's own (non-zero-mean) update then sees all-zero local counts: sign(0) = 0, so it
    leaves the bias as we set it, and it resets the counters as usual.
    """
    if megatron_finalize is None:
        from megatron.core.distributed import finalize_model_grads as megatron_finalize

    def finalize(model, *args, **kwargs):
        from megatron.core import parallel_state as ps

        rs = routers(model)
        if rs:
            with torch.no_grad():
                tokens = torch.stack([r.local_tokens_per_expert.float() for r in rs])
                if torch.distributed.is_initialized():
                    torch.distributed.all_reduce(
                        tokens, group=ps.get_tensor_and_data_parallel_group(with_context_parallel=True))
                if zero_mean:
                    bias = torch.stack([r.expert_bias.float() for r in rs])
                    new = zero_mean_bias_update(tokens, bias, rs[0].config.moe_router_bias_update_rate)
                    for r, b in zip(rs, new):
                        r.expert_bias.copy_(b)
                        r.local_tokens_per_expert.zero_()
                if stats is not None:
                    stats.tokens = tokens
                    stats.layer_ids = [_router_name(r) for r in rs]
                    stats.bias = torch.stack([r.expert_bias.detach().float() for r in rs])
        return megatron_finalize(model, *args, **kwargs)

    return finalize


def wrap_half_precision(tf_config, chunk):
    """Wrap a model chunk for bf16/fp16 (Megatron's Float16Module) keeping every expert bias fp32
    with its exact value. Float16Module casts buffers too (Megatron-LM issue #1482); megatron-core
    0.16.1 casts the bias back only at the next forward, after it was rounded to bf16."""
    from megatron.core.transformer.module import Float16Module

    saved = [(r, r.expert_bias.detach().clone()) for r in routers([chunk])]
    wrapped = Float16Module(tf_config, chunk)
    for r, b in saved:
        r.expert_bias.data = b.to(torch.float32)
    return wrapped


def assert_fp32_expert_bias(model_chunks) -> None:
    bad = [r for r in routers(model_chunks) if r.expert_bias.dtype != torch.float32]
    if bad:
        raise RuntimeError(f"expert_bias of {_router_name(bad[0])} is {bad[0].expert_bias.dtype}, must be fp32")
