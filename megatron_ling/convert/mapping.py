"""The Megatron <-> HF BailingMoeV2 mapping (FACTS §3): ONE declarative table, in the spirit of
Megatron-Bridge's ``mapping_registry``. Every converter (to-hf, from-hf) and the full <-> sharded
weight loader of the tests read it; nothing else spells a Megatron or HF tensor name.

Megatron-Core (0.16) writes torch_dist checkpoints with *layout-independent* keys: one key per
layer (global layer number, whatever the PP/VPP stage), full global shapes (TP/ETP shards are
chunks of it), experts stacked on a prepended global expert axis ``[E, ...]`` (EP shards are
chunks of it). The local spec writes its norms under Transformer Engine's fused spelling
(``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``) through
``sharded_state_dict_keys_map``; a TE model writes MoE layers' pre-MLP norm as
``pre_mlp_layernorm.weight``. The MTP inner layer is ``transformer_layer`` (megatron-core <= 0.16)
or ``mtp_model_layer`` (newer). All spellings are accepted when reading; the writer uses the
first one, which megatron-core 0.16.1 writes itself.

A *unit* is "embed", "final" (norm + lm_head), ("layer", i) or ("mtp", j); a *role* names one
Megatron tensor inside it. Everything works on one unit at a time: that keeps conversion streaming.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron_ling.errors import LingConfigError
from megatron_ling.models.config import LingConfig


# ------------------------------------------------------------------------- transforms
def qkv_megatron_to_hf(w: torch.Tensor, cfg: LingConfig) -> torch.Tensor:
    """Megatron rows per query group g: [nh/nkv Q heads | K_g | V_g] -> HF [all Q | all K | all V]."""
    nkv, hd = cfg.num_key_value_heads, cfg.head_dim
    per = cfg.num_attention_heads // nkv
    g = w.reshape(nkv, per + 2, hd, w.shape[-1])
    return torch.cat([g[:, :per].reshape(-1, w.shape[-1]), g[:, per].reshape(-1, w.shape[-1]),
                      g[:, per + 1].reshape(-1, w.shape[-1])], 0)


def qkv_hf_to_megatron(w: torch.Tensor, cfg: LingConfig) -> torch.Tensor:
    nkv, hd, nh = cfg.num_key_value_heads, cfg.head_dim, cfg.num_attention_heads
    per = nh // nkv
    cols = w.shape[-1]
    q, k, v = torch.split(w, [nh * hd, nkv * hd, nkv * hd], 0)
    return torch.cat([q.reshape(nkv, per, hd, cols), k.reshape(nkv, 1, hd, cols), v.reshape(nkv, 1, hd, cols)],
                     1).reshape(-1, cols)


# Transform kinds. "copy": one tensor each side. "qkv": regroup rows. "gate_up": Megatron's SwiGLU
# fc1 = [gate; up] rows -> HF gate_proj, up_proj. "experts": the stacked [E, ...] tensor -> one HF
# tensor per expert. "experts_gate_up": both (per expert, gate then up).
COPY, QKV, GATE_UP, EXPERTS, EXPERTS_GATE_UP = "copy", "qkv", "gate_up", "experts", "experts_gate_up"


@dataclass(frozen=True)
class Mapping:
    """One Megatron tensor and the HF tensor(s) it becomes.

    ``megatron``: its spellings (in a layer: relative to ``decoder.layers.{i}.`` or the MTP inner
    layer; MTP-only roles relative to ``mtp.layers.{j}.``; global roles: the full key); the first is
    written. ``hf``: HF names relative to the unit's HF prefix, ``{e}`` = expert index.
    ``shape``: the global Megatron shape. ``when``: whether a unit of this config holds it.
    ``extra_state``: the module whose ``_extra_state`` megatron-core 0.16.1 saves next to it."""

    role: str
    scope: str  # "global", "layer" (decoder and MTP inner layer) or "mtp" (MTP layer itself)
    megatron: tuple[str, ...]
    hf: tuple[str, ...]
    shape: Callable[[LingConfig], tuple[int, ...]]
    transform: str = COPY
    when: Callable[[LingConfig, bool], bool] = lambda cfg, moe: True  # (cfg, is MoE layer)
    extra_state: Optional[str] = None


def _H(c):
    return c.hidden_size


def _fs(c):
    return c.moe_intermediate_size * c.num_shared_experts


def _dense(c, moe):
    return not moe


def _moe(c, moe):
    return moe


MAPPINGS: tuple[Mapping, ...] = (
    # global
    Mapping("embed", "global", ("embedding.word_embeddings.weight",), ("model.word_embeddings.weight",),
            lambda c: (c.vocab_size, _H(c))),
    Mapping("norm", "global", ("decoder.final_layernorm.weight",), ("model.norm.weight",), lambda c: (_H(c),)),
    Mapping("lm_head", "global", ("output_layer.weight",), ("lm_head.weight",), lambda c: (c.vocab_size, _H(c)),
            when=lambda c, moe: not c.tie_word_embeddings),
    # MTP layer (around its inner transformer layer)
    Mapping("enorm", "mtp", ("enorm.weight",), ("enorm.weight",), lambda c: (_H(c),)),
    Mapping("hnorm", "mtp", ("hnorm.weight",), ("hnorm.weight",), lambda c: (_H(c),)),
    Mapping("eh_proj", "mtp", ("eh_proj.weight",), ("eh_proj.weight",), lambda c: (_H(c), 2 * _H(c)),
            extra_state="eh_proj"),
    # attention
    Mapping("input_norm", "layer", ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
            ("input_layernorm.weight",), lambda c: (_H(c),)),
    Mapping("qkv", "layer", ("self_attention.linear_qkv.weight",), ("attention.query_key_value.weight",),
            lambda c: ((c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim, _H(c)), QKV,
            extra_state="self_attention.linear_qkv"),
    Mapping("proj", "layer", ("self_attention.linear_proj.weight",), ("attention.dense.weight",),
            lambda c: (_H(c), c.num_attention_heads * c.head_dim), extra_state="self_attention.linear_proj"),
    Mapping("q_norm", "layer", ("self_attention.q_layernorm.weight",), ("attention.query_layernorm.weight",),
            lambda c: (c.head_dim,), when=lambda c, moe: c.use_qk_norm),
    Mapping("k_norm", "layer", ("self_attention.k_layernorm.weight",), ("attention.key_layernorm.weight",),
            lambda c: (c.head_dim,), when=lambda c, moe: c.use_qk_norm),
    Mapping("post_norm", "layer", ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
            ("post_attention_layernorm.weight",), lambda c: (_H(c),)),
    # dense MLP (layers < first_k_dense_replace)
    Mapping("fc1", "layer", ("mlp.linear_fc1.weight",), ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
            lambda c: (2 * c.intermediate_size, _H(c)), GATE_UP, _dense, extra_state="mlp.linear_fc1"),
    Mapping("fc2", "layer", ("mlp.linear_fc2.weight",), ("mlp.down_proj.weight",),
            lambda c: (_H(c), c.intermediate_size), when=_dense, extra_state="mlp.linear_fc2"),
    # MoE
    Mapping("router", "layer", ("mlp.router.weight",), ("mlp.gate.weight",), lambda c: (c.num_experts, _H(c)),
            when=_moe),
    Mapping("expert_bias", "layer", ("mlp.router.expert_bias",), ("mlp.gate.expert_bias",),
            lambda c: (c.num_experts,), when=lambda c, moe: moe and c.moe_router_enable_expert_bias),
    Mapping("experts_fc1", "layer", ("mlp.experts.experts.linear_fc1.weight", "mlp.experts.linear_fc1.weight"),
            ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"),
            lambda c: (c.num_experts, 2 * c.moe_intermediate_size, _H(c)), EXPERTS_GATE_UP, _moe,
            extra_state="mlp.experts.experts.linear_fc1"),
    Mapping("experts_fc2", "layer", ("mlp.experts.experts.linear_fc2.weight", "mlp.experts.linear_fc2.weight"),
            ("mlp.experts.{e}.down_proj.weight",),
            lambda c: (c.num_experts, _H(c), c.moe_intermediate_size), EXPERTS, _moe,
            extra_state="mlp.experts.experts.linear_fc2"),
    Mapping("shared_fc1", "layer", ("mlp.shared_experts.linear_fc1.weight",),
            ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"),
            lambda c: (2 * _fs(c), _H(c)), GATE_UP, lambda c, moe: moe and bool(c.num_shared_experts),
            extra_state="mlp.shared_experts.linear_fc1"),
    Mapping("shared_fc2", "layer", ("mlp.shared_experts.linear_fc2.weight",),
            ("mlp.shared_experts.down_proj.weight",), lambda c: (_H(c), _fs(c)),
            when=lambda c, moe: moe and bool(c.num_shared_experts), extra_state="mlp.shared_experts.linear_fc2"),
    Mapping("final_layernorm", "mtp", ("final_layernorm.weight",), ("final_layernorm.weight",), lambda c: (_H(c),)),
)
BY_ROLE = {m.role: m for m in MAPPINGS}
MTP_INNER = ("transformer_layer", "mtp_model_layer")  # written: megatron-core 0.16.1's
# Names in a model's (unsharded) state_dict that differ from the torch_dist keys above: the
# per-expert modules of the local spec (SequentialMLP) and Transformer Engine's GroupedMLP.
LAYER_PREFIX = re.compile(r"^(decoder|mtp)\.layers\.(\d+)\.")
LOCAL_EXPERT = re.compile(r"\.experts\.local_experts\.(\d+)\.")
GROUPED_EXPERT = re.compile(r"\.experts\.(linear_fc[12])\.weight(\d+)$")
_NOT_WEIGHTS = ("optimizer.", "rng_state", "rerun_state_machine")


def is_expert_weight(name: str) -> bool:
    """A routed expert's tensor (split over the expert-parallel groups), not a shared expert's."""
    return ".experts." in name and ".shared_experts." not in name


_GLOBAL = {s: m for m in MAPPINGS if m.scope == "global" for s in m.megatron}
_IN_LAYER = {s: m for m in MAPPINGS if m.scope == "layer" for s in m.megatron}
_IN_MTP = {s: m for m in MAPPINGS if m.scope == "mtp" for s in m.megatron}
_DECODER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_MTP_RE = re.compile(r"^mtp\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Slot:
    """Where a Megatron tensor belongs: its unit and its role inside it."""

    unit: object
    role: str


def classify(key: str) -> Slot | None:
    """Map a torch_dist tensor key to its Slot; None for keys that are not model weights
    (optimizer state, RNG state, ...). Raises LingConfigError for an unknown model key."""
    if key.startswith(_NOT_WEIGHTS) or key.endswith("_extra_state"):
        return None
    if key in _GLOBAL:
        return Slot("embed" if _GLOBAL[key].role == "embed" else "final", _GLOBAL[key].role)
    m = _DECODER_RE.match(key)
    if m and m.group(2) in _IN_LAYER:
        return Slot(("layer", int(m.group(1))), _IN_LAYER[m.group(2)].role)
    m = _MTP_RE.match(key)
    if m:
        j, rest = int(m.group(1)), m.group(2)
        if rest in _IN_MTP:
            return Slot(("mtp", j), _IN_MTP[rest].role)
        for inner in MTP_INNER:
            if rest.startswith(inner + ".") and rest[len(inner) + 1:] in _IN_LAYER:
                return Slot(("mtp", j), _IN_LAYER[rest[len(inner) + 1:]].role)
    raise LingConfigError(f"checkpoint: unknown model tensor key {key!r}; megatron-ling converts Ling 2.0 "
                          f"(BailingMoeV2) models only - was this checkpoint written by another model?")


def _megatron_prefix(unit, scope: str, mtp_inner: str) -> str:
    if scope == "global":
        return ""
    kind, i = unit
    if kind == "layer":
        return f"decoder.layers.{i}."
    return f"mtp.layers.{i}." if scope == "mtp" else f"mtp.layers.{i}.{mtp_inner}."


def megatron_key(unit, role: str, mtp_inner: str = MTP_INNER[0]) -> str:
    """The key megatron-core 0.16.1 (local spec) writes for a Slot."""
    m = BY_ROLE[role]
    return _megatron_prefix(unit, m.scope, mtp_inner) + m.megatron[0]


def extra_state_keys(cfg: LingConfig, unit, role: str, mtp_inner: str = MTP_INNER[0]) -> list[str]:
    """The ShardedObject keys megatron-core 0.16.1 saves for the module holding ``role`` (one per
    expert for the expert roles), so that a strict load finds exactly the keys it asks for."""
    m = BY_ROLE[role]
    if m.extra_state is None:
        return []
    base = _megatron_prefix(unit, m.scope, mtp_inner) + m.extra_state + "._extra_state"
    if m.transform in (EXPERTS, EXPERTS_GATE_UP):
        return [f"{base}/shard_{e}_{cfg.num_experts}" for e in range(cfg.num_experts)]
    return [f"{base}/shard_0_1"]


# ------------------------------------------------------------------------- units and shapes
def units(cfg: LingConfig, mtp: bool = True) -> list:
    """Conversion units in HF order: embeddings, decoder layers, MTP layers, final norm + head."""
    out = ["embed"] + [("layer", i) for i in range(cfg.num_hidden_layers)]
    if mtp:
        out += [("mtp", j) for j in range(cfg.num_nextn_predict_layers)]
    return out + ["final"]


def layer_roles(cfg: LingConfig, unit) -> list[str]:
    """Roles one unit holds, in the order they are converted (the table's order)."""
    if unit in ("embed", "final"):
        return [m.role for m in MAPPINGS if m.scope == "global" and (m.role == "embed") == (unit == "embed")
                and m.when(cfg, False)]
    kind, i = unit
    moe = kind == "mtp" or i >= cfg.first_k_dense_replace
    scopes = ("layer", "mtp") if kind == "mtp" else ("layer",)
    return [m.role for m in MAPPINGS if m.scope in scopes and m.when(cfg, moe)]


def megatron_shape(cfg: LingConfig, role: str) -> tuple[int, ...]:
    return tuple(BY_ROLE[role].shape(cfg))


def hf_prefix(cfg: LingConfig, unit) -> str:
    """HF numbers MTP layers after the decoder layers."""
    if unit in ("embed", "final"):
        return ""
    kind, i = unit
    return f"model.layers.{i if kind == 'layer' else cfg.num_hidden_layers + i}."


def hf_names(cfg: LingConfig, unit, role: str) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensor names (and shapes) that one Megatron role becomes, in order."""
    m, p, shape = BY_ROLE[role], hf_prefix(cfg, unit), megatron_shape(cfg, role)
    if m.transform in (COPY, QKV):
        return [(p + m.hf[0], shape)]
    if m.transform == GATE_UP:
        return [(p + n, (shape[0] // 2,) + shape[1:]) for n in m.hf]
    per_expert = (shape[1] // len(m.hf),) + shape[2:]  # EXPERTS: one name; EXPERTS_GATE_UP: gate, up
    return [(p + n.format(e=e), per_expert) for e in range(shape[0]) for n in m.hf]


def role_to_hf(cfg: LingConfig, role: str, t: torch.Tensor) -> list[torch.Tensor]:
    """One Megatron tensor -> its HF tensor(s), in the order of ``hf_names``."""
    kind = BY_ROLE[role].transform
    if kind == QKV:
        return [qkv_megatron_to_hf(t, cfg)]
    if kind == GATE_UP:
        return list(torch.chunk(t, 2, 0))
    if kind == EXPERTS_GATE_UP:
        return [half for e in range(t.shape[0]) for half in torch.chunk(t[e], 2, 0)]
    if kind == EXPERTS:
        return list(t.unbind(0))
    return [t]


def hf_box(cfg: LingConfig, role: str, j: int):
    """Where HF tensor ``j`` of ``role`` (``hf_names`` order) lies in the global Megatron tensor:
    (offsets, sizes, drop the expert axis?) - or None for QKV, whose rows are regrouped. Lets to-hf
    take each HF tensor as a view of one saved chunk instead of assembling the Megatron tensor."""
    kind, shape = BY_ROLE[role].transform, megatron_shape(cfg, role)
    zeros = (0,) * len(shape)
    if kind == COPY:
        return zeros, shape, False
    if kind == GATE_UP:
        half = shape[0] // 2
        return (j * half,) + zeros[1:], (half,) + shape[1:], False
    if kind == EXPERTS:
        return (j,) + zeros[1:], (1,) + shape[1:], True
    if kind == EXPERTS_GATE_UP:
        half = shape[1] // 2
        return (j // 2, (j % 2) * half) + zeros[2:], (1, half) + shape[2:], True
    return None


def role_chunks_from_hf(cfg: LingConfig, role: str, ts: list[torch.Tensor], start: int = 0):
    """``role_from_hf`` as (offsets, tensor) chunks of the global Megatron tensor, without
    concatenating: [gate; up] halves become two chunks (as megatron itself saves SwiGLU fc1), each
    expert its own chunk(s) on the expert axis. ``start``: for a role whose HF tensors are one
    chunk each (:func:`one_chunk_per_hf_tensor`), ``ts`` may be ``hf_names(...)[start:start + len(ts)]``
    only, and yields just their chunks (a run of experts: from-hf splits a layer between files)."""
    kind = BY_ROLE[role].transform
    if start and not one_chunk_per_hf_tensor(role):
        raise ValueError(f"{role}: its HF tensors are not one chunk each; convert them all at once")
    if kind == GATE_UP:
        return [((0, 0), ts[0]), ((ts[0].shape[0], 0), ts[1])]
    if kind == EXPERTS_GATE_UP:
        f = ts[0].shape[0]
        return (((e // 2, (e % 2) * f, 0), t.unsqueeze(0)) for e, t in enumerate(ts, start))
    if kind == EXPERTS:
        return (((e, 0, 0), t.unsqueeze(0)) for e, t in enumerate(ts, start))
    t = role_from_hf(cfg, role, ts)
    return [((0,) * t.dim(), t)]


def one_chunk_per_hf_tensor(role: str) -> bool:
    """Whether each HF tensor of ``role`` is, on its own, one whole chunk of the Megatron tensor
    (the expert stacks: one chunk per expert, or per gate / up half): any run of them can be
    converted and stored apart from the rest, so a layer's experts can be split between files."""
    return BY_ROLE[role].transform in (EXPERTS, EXPERTS_GATE_UP)


def chunks_are_hf_tensors(role: str) -> bool:
    """Whether ``role_chunks_from_hf`` yields the HF tensors themselves, one chunk each, in
    ``hf_names`` order (only reshaped: an expert axis of 1): then a chunk's bytes are exactly its
    HF tensor's bytes, and from-hf can copy them file to file. Not for QKV (rows regrouped)."""
    return BY_ROLE[role].transform != QKV


def role_from_hf(cfg: LingConfig, role: str, ts: list[torch.Tensor], stack: bool = True):
    """Inverse of ``role_to_hf``. For expert roles with ``stack=False``: the list of per-expert
    Megatron tensors, made one at a time (the global ``[E, ...]`` tensor is never materialised)."""
    kind = BY_ROLE[role].transform
    if kind == QKV:
        return qkv_hf_to_megatron(ts[0], cfg)
    if kind == GATE_UP:
        return torch.cat(ts, 0)
    if kind == EXPERTS_GATE_UP:
        experts = (torch.cat(ts[2 * e: 2 * e + 2], 0) for e in range(len(ts) // 2))
        return torch.stack(list(experts)) if stack else experts
    if kind == EXPERTS:
        return torch.stack(ts) if stack else list(ts)
    return ts[0]


def is_mtp_hf_name(cfg: LingConfig, name: str) -> bool:
    """An HF tensor of an MTP layer (HF numbers them from num_hidden_layers on)."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return bool(m) and int(m.group(1)) >= cfg.num_hidden_layers
