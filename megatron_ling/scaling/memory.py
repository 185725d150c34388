"""Per-rank memory of a recipe at its parallel layout (``ling-plan memory``).

Parameters are counted tensor by tensor from the model's Megatron shapes (``convert.mapping``) and
split the way megatron-core splits them: attention / dense-MLP / shared-expert linears, the word
embedding and the output layer over TP; routed experts over EP x expert-TP; norms and the router
replicated; the expert bias is a buffer (no gradient, no optimizer state). Pipeline ranks hold the
units of their stages (``parallel.pipeline_layout``, or megatron's uniform split); a standalone
MTP stage also holds its copy of the word embedding.

Bytes per parameter: weights 4 (fp32) or 2 (bf16/fp16); gradients 4 (megatron DDP's fp32 main-grad
buffer); optimizer 8 for Adam's two moments + 4 for the fp32 master copy when training in
bf16/fp16, divided over the data-parallel group by the distributed optimizer (dense parameters
over DP x CP, experts over the expert-data-parallel group). Activations come from the profiling
cost model's per-unit estimate for one micro batch, times the micro batches in flight on the rank
under 1F1B (pp - pp_rank, at most the number of micro batches).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_ling.convert import mapping as N
from megatron_ling.parallel.layout import check_layout, embedding_pp_ranks, expand, uniform_layout

_TP_SPLIT = {"embed", "lm_head", "qkv", "proj", "fc1", "fc2", "shared_fc1", "shared_fc2", "eh_proj"}
_EXPERT = {"experts_fc1", "experts_fc2"}
_BUFFERS = {"expert_bias"}


@dataclass
class RankMemory:
    pp_rank: int
    dense_params: float  # parameters on this rank outside the routed experts
    expert_params: float
    param_bytes: float
    grad_bytes: float
    optimizer_bytes: float
    activation_bytes: float

    @property
    def params(self) -> float:
        return self.dense_params + self.expert_params

    @property
    def total_bytes(self) -> float:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes


def default_world_size(parallel) -> int:
    """The smallest world the layout runs on (data-parallel size 1 where EP allows it)."""
    inner = parallel.tp * parallel.cp
    return math.lcm(inner, parallel.ep * parallel.expert_tp) * parallel.pp


def _stages(recipe, ling) -> list[str]:
    par = recipe.parallel
    mtp = ling.num_nextn_predict_layers
    if par.pp == 1:
        return ["E" + "t" * ling.num_hidden_layers + "m" * mtp + "L"]
    if par.pipeline_layout and par.pipeline_layout != "auto":
        return expand(par.pipeline_layout)
    first, last = par.num_layers_in_first_pipeline_stage, par.num_layers_in_last_pipeline_stage
    if first is not None or last is not None:
        n_mid = par.pp - (first is not None) - (last is not None)
        rest = ling.num_hidden_layers - (first or 0) - (last or 0)
        counts = ([first] if first is not None else []) + [rest // max(n_mid, 1)] * n_mid + \
                 ([last] if last is not None else [])
        st = ["t" * c for c in counts]
        st[0], st[-1] = "E" + st[0], st[-1] + "m" * mtp + "L"
        return st
    return expand(uniform_layout(ling.num_hidden_layers, mtp, par.pp, par.vpp or 1))


def _units(stage: str, first_layer: int) -> tuple[list, int]:
    out, li, j = [], first_layer, 0
    for ch in stage:
        if ch == "E":
            out.append("embed")
        elif ch == "t":
            out.append(("layer", li))
            li += 1
        elif ch == "m":
            out.append(("mtp", j))
            j += 1
        elif ch == "L":
            out.append("final")
    return out, li


def estimate_memory(recipe, world_size: int | None = None) -> list[RankMemory]:
    """Per pipeline rank (the ranks of one stage are alike): parameter, gradient, optimizer and
    activation bytes."""
    from megatron_ling.pipeline.costmodel import CostModel, CostOptions

    ling = recipe.model.ling_config()
    par, t, opts = recipe.parallel, recipe.training, recipe.model.options()
    world = world_size or default_world_size(par)
    recipe.validate(world)
    flat = _stages(recipe, ling)
    if par.pp > 1 and par.pipeline_layout and par.pipeline_layout != "auto":
        check_layout(par.pipeline_layout, par.pp, ling.num_hidden_layers, ling.num_nextn_predict_layers, par.vpp)
    half = opts.precision in ("bf16", "fp16")
    dp_dense = world // (par.tp * par.pp)  # DP x CP: the distributed optimizer's dense group
    dp_expert = world // (par.ep * par.expert_tp * par.pp)
    emb_ranks = embedding_pp_ranks(par.pipeline_layout if par.pipeline_layout != "auto" else None, par.pp,
                                   ling.tie_word_embeddings)
    cm = CostModel(ling, CostOptions(seq_length=t.seq_length, micro_batch_size=t.micro_batch_size, tp=par.tp,
                                     ep=par.ep, cp=par.cp, act_bytes=2 if half else 4,
                                     recompute="full" if opts.recompute == "full" else "none"))
    nmb = recipe.num_microbatches(world)
    per_rank: dict[int, list] = {r: [] for r in range(par.pp)}
    li = 0
    for i, st in enumerate(flat):
        units, li_next = _units(st, li)
        per_rank[i % par.pp].append((st, li, units))
        li = li_next
    out = []
    for r in range(par.pp):
        dense = expert = 0.0
        units = [u for _, _, us in per_rank[r] for u in us]
        if r in emb_ranks and "embed" not in units and any(isinstance(u, tuple) and u[0] == "mtp" for u in units):
            units.append("embed")  # a standalone MTP stage's copy of the word embedding
        for u in units:
            for role in N.layer_roles(ling, u):
                n = math.prod(N.megatron_shape(ling, role))
                if role in _BUFFERS:
                    continue
                if role in _EXPERT:
                    expert += n / (par.ep * par.expert_tp)
                elif role in _TP_SPLIT:
                    dense += n / par.tp
                else:
                    dense += n
        n = dense + expert
        opt_per = 8 + (4 if half else 0)
        if par.distributed_optimizer:
            optim = opt_per * (dense / dp_dense + expert / dp_expert)
        else:
            optim = opt_per * n
        act = 0.0
        in_flight = min(nmb, par.pp - r)
        for st, first, _ in per_rank[r]:
            act += sum(cm.unit(k).act_bytes for k in cm.stage_units(st, first)) * in_flight
        out.append(RankMemory(pp_rank=r, dense_params=dense, expert_params=expert, param_bytes=n * (2 if half else 4),
                              grad_bytes=4 * n, optimizer_bytes=optim, activation_bytes=act))
    return out
