"""One full (unsharded) set of Ling weights <-> any Megatron-Core parallel layout.

Megatron-Core layouts do not reproduce the same initialisation from one seed (expert-parallel and
pipeline ranks draw different random streams), so everything that must compare or convert
weights across layouts goes through a *full state dict*: what a single-process model (TP = PP =
EP = 1, no virtual stages) returns from ``GPTModel.state_dict()``, without ``_extra_state``.
Its names are layout independent:

    embedding.word_embeddings.weight                   [V, H]
    decoder.layers.{i}.<...>                           i = global layer index (0-based)
    decoder.layers.{i}.mlp.router.expert_bias          [E] fp32 buffer (kept exact, never cast)
    decoder.layers.{i}.mlp.experts.local_experts.{e}.<...>   e = global expert index
    decoder.final_layernorm.weight, output_layer.weight
    mtp.layers.{j}.<...>                               j = global MTP layer index

(with Transformer Engine's grouped experts, ``experts.linear_fc{1,2}.weight{e}`` with global e); these
spellings are the mapping table's (``megatron_ling.convert.mapping``).

Sharding rules are read from the parameters themselves (megatron-core's ``tensor_model_parallel``,
``partition_dim`` and ``partition_stride`` attributes), so they follow megatron-core: e.g. the
SwiGLU ``linear_fc1`` has stride 2, each TP rank holding [gate_r; up_r]. Expert weights are split
over the expert-tensor-parallel group and distributed over the expert-parallel group; everything
else over the tensor-parallel group. A weight that several ranks hold (DP replicas, norms under
TP, the embedding copy on the MTP stage) is loaded into every holder and, when gathered, checked
to be identical on every holder (:class:`ReplicaMismatch` otherwise -- that is how a layout that
silently lets replicas diverge is caught).

:func:`gather_full_state_dict` collects every rank's shards with ``gather_object``: memory is
O(model) on the receiving rank, meant for tests and small models; large models are converted
through Megatron-Core's distributed checkpoints instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from megatron_ling.convert.mapping import GROUPED_EXPERT as _GROUPED_EXPERT
from megatron_ling.convert.mapping import LAYER_PREFIX as _LAYER
from megatron_ling.convert.mapping import LOCAL_EXPERT as _LOCAL_EXPERT
from megatron_ling.convert.mapping import is_expert_weight as _is_expert


class WeightMappingError(KeyError):
    """A full state dict does not fit a model (missing name, wrong shape)."""

    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ReplicaMismatch(AssertionError):
    """Two ranks hold different values for the same weight (or the same shard of it)."""


@dataclass(frozen=True)
class ShardInfo:
    """How a local tensor is cut out of its full tensor: piece ``rank`` of ``size`` along ``dim``,
    with megatron's ``stride`` (the full tensor is cut in size*stride pieces, rank r takes r::size)."""

    dim: int
    stride: int
    rank: int
    size: int


def unwrap(chunk):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _parallel_ranks() -> dict:
    from megatron.core import parallel_state as ps

    if not (torch.distributed.is_initialized() and ps.model_parallel_is_initialized()):
        return dict(tp=(0, 1), etp=(0, 1), ep=(0, 1))
    return dict(
        tp=(ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
        etp=(ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()),
        ep=(ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()),
    )


def _local_tensors(model) -> dict:
    """name -> tensor (parameters and persistent buffers) of one GPTModel chunk."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}


def canonical_names(model) -> dict:
    """{local state-dict name: full (layout independent) name} for one GPTModel chunk."""
    ranks = _parallel_ranks()
    ep_rank = ranks["ep"][0]
    layer_index = {}
    for stack in ("decoder", "mtp"):
        block = getattr(model, stack, None)
        for i, layer in enumerate(getattr(block, "layers", []) if block is not None else []):
            layer_index[(stack, i)] = layer.layer_number - 1  # layer_number is global, 1-based
    n_local_cache: dict = {}

    def n_local(prefix: str) -> int:
        if prefix not in n_local_cache:
            experts = model.get_submodule(prefix)
            n = getattr(experts, "num_local_experts", None)
            if n is None:
                n = len(experts.local_experts)
            n_local_cache[prefix] = n
        return n_local_cache[prefix]

    out = {}
    for name in _local_tensors(model):
        full = name
        m = _LAYER.match(name)
        if m:
            full = f"{m.group(1)}.layers.{layer_index[(m.group(1), int(m.group(2)))]}." + name[m.end():]
        m = _LOCAL_EXPERT.search(name)
        if m:
            prefix = name[:m.start()] + ".experts"
            g = ep_rank * n_local(prefix) + int(m.group(1))
            full = _LOCAL_EXPERT.sub(f".experts.local_experts.{g}.", full, count=1)
        else:
            m = _GROUPED_EXPERT.search(name)
            if m:
                prefix = name[:m.start()] + ".experts"
                g = ep_rank * n_local(prefix) + int(m.group(2))
                full = full[:full.rindex(".weight")] + f".weight{g}"
        out[name] = full
    return out


def shard_info(name: str, tensor) -> Optional[ShardInfo]:
    """Where this rank's ``tensor`` sits in the full tensor, or None if it is not split."""
    if not getattr(tensor, "tensor_model_parallel", False):
        return None
    ranks = _parallel_ranks()
    rank, size = ranks["etp"] if _is_expert(name) else ranks["tp"]
    return ShardInfo(dim=int(tensor.partition_dim), stride=int(getattr(tensor, "partition_stride", 1)),
                     rank=rank, size=size)


def shard_tensor(full: torch.Tensor, info: Optional[ShardInfo]) -> torch.Tensor:
    if info is None or info.size == 1:
        return full
    pieces = torch.chunk(full, info.size * info.stride, dim=info.dim)
    return torch.cat(pieces[info.rank::info.size], dim=info.dim)


def unshard_tensor(parts: list, dim: int, stride: int) -> torch.Tensor:
    """Inverse of :func:`shard_tensor` given every rank's piece (in rank order)."""
    size = len(parts)
    if size == 1:
        return parts[0]
    per_rank = [torch.chunk(p, stride, dim=dim) for p in parts]
    return torch.cat([per_rank[r][s] for s in range(stride) for r in range(size)], dim=dim)


@torch.no_grad()
def load_full_state_dict(chunks: Iterable, full: dict, strict: bool = True, optimizer=None) -> set:
    """Copy the matching shard of every tensor of ``full`` into this rank's model chunks (a list
    of GPTModel chunks, DDP / Float16Module wrapped or not). Values are copied in place, so DDP's
    contiguous buffers stay intact; each tensor keeps its dtype (bf16 weights are rounded, the
    fp32 expert bias stays exact).

    ``strict``: every local tensor must be in ``full`` with the right shape (WeightMappingError
    otherwise). Call before building the optimizer, or pass ``optimizer`` so that fp32 main
    copies of half-precision weights are refreshed. Returns the full names used on this rank."""
    used = set()
    for chunk in chunks:
        model = unwrap(chunk)
        names = canonical_names(model)
        for local, t in _local_tensors(model).items():
            src = names[local]
            if src not in full:
                if strict:
                    raise WeightMappingError(f"{src} (local {local}) is not in the full state dict")
                continue
            value = shard_tensor(full[src], shard_info(local, t))
            if tuple(value.shape) != tuple(t.shape):
                raise WeightMappingError(f"{src}: full tensor {tuple(full[src].shape)} gives a shard of "
                                         f"{tuple(value.shape)} here, but the model holds {tuple(t.shape)} "
                                         f"(local {local}); does the model config match the weights?")
            t.copy_(value.to(device=t.device))
            used.add(src)
    if optimizer is not None and hasattr(optimizer, "reload_model_params"):
        optimizer.reload_model_params()
    return used


def sync_params(chunks: Iterable) -> None:
    """Finish a pending overlapped parameter all-gather (distributed optimizer with
    overlap_param_gather updates local shards only; the gather normally runs in the next forward)."""
    for chunk in chunks:
        if hasattr(chunk, "start_param_sync") and getattr(getattr(chunk, "ddp_config", None),
                                                          "overlap_param_gather", False):
            chunk.start_param_sync(force_sync=True)


def local_shards(chunks: Iterable, dtype: Optional[torch.dtype] = None) -> list:
    """[(full name, ShardInfo or None, CPU tensor)] for this rank."""
    out = []
    for chunk in chunks:
        model = unwrap(chunk)
        names = canonical_names(model)
        for local, t in _local_tensors(model).items():
            v = t.detach().to("cpu", copy=True)
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            out.append((names[local], shard_info(local, t), v))
    return out


def assemble(entries: Iterable, check_replicas: bool = True, atol: float = 0.0) -> dict:
    """Full state dict from every rank's :func:`local_shards` entries."""
    parts: dict = {}
    meta: dict = {}
    for name, info, t in entries:
        key = (info.dim, info.stride, info.size) if info is not None else None
        if name in meta and meta[name] != key:
            raise ReplicaMismatch(f"{name}: ranks disagree on its sharding ({meta[name]} vs {key})")
        meta[name] = key
        idx = info.rank if info is not None else 0
        slot = parts.setdefault(name, {})
        if idx in slot:
            if check_replicas:
                ref = slot[idx]
                same_shape = ref.shape == t.shape
                diff = (ref.float() - t.float()).abs().max().item() if same_shape and t.numel() else 0.0
                if not same_shape or diff > atol:
                    raise ReplicaMismatch(
                        f"{name}{'' if info is None else f' (shard {idx}/{info.size})'}: two ranks hold different "
                        f"values (max |diff| {diff:.3e}" + ("" if same_shape else f", shapes {tuple(ref.shape)} vs "
                                                            f"{tuple(t.shape)}") + ")")
        else:
            slot[idx] = t
    full = {}
    for name, slot in parts.items():
        key = meta[name]
        if key is None:
            full[name] = slot[0]
            continue
        dim, stride, size = key
        missing = [r for r in range(size) if r not in slot]
        if missing:
            raise WeightMappingError(f"{name}: shards {missing} of {size} were not found on any rank")
        full[name] = unshard_tensor([slot[r] for r in range(size)], dim, stride)
    return dict(sorted(full.items()))


def gather_full_state_dict(chunks: Iterable, dst: Optional[int] = None, check_replicas: bool = True,
                           atol: float = 0.0, dtype: Optional[torch.dtype] = None) -> Optional[dict]:
    """The full state dict of a model spread over every rank of the default process group.
    ``dst=None``: returned on every rank; otherwise on rank ``dst`` only (None elsewhere).
    Collective: every rank must call it. Pending overlapped param gathers are finished first."""
    chunks = list(chunks)
    sync_params(chunks)
    mine = local_shards(chunks, dtype)
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return assemble(mine, check_replicas, atol)
    world = torch.distributed.get_world_size()
    if dst is None:
        everyone = [None] * world
        torch.distributed.all_gather_object(everyone, mine)
    else:
        everyone = [None] * world if torch.distributed.get_rank() == dst else None
        torch.distributed.gather_object(mine, everyone, dst=dst)
        if everyone is None:
            return None
    return assemble((e for rank_entries in everyone for e in rank_entries), check_replicas, atol)
