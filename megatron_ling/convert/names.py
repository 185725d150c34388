"""Name and layout mapping between Megatron-Core torch_dist keys and HF BailingMoeV2 (FACTS §3).

Megatron-Core (0.16) writes torch_dist checkpoints with *layout-independent* keys: one key per
layer (global layer number, whatever the PP/VPP stage), full global shapes (TP/ETP shards are
chunks of it), experts stacked on a prepended global expert axis ``[E, ...]`` (EP shards are
chunks of it). The local spec writes its norms under Transformer Engine's fused spelling
(``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``) through
``sharded_state_dict_keys_map``; a TE model writes MoE layers' pre-MLP norm as
``pre_mlp_layernorm.weight``. The MTP inner layer is ``transformer_layer`` (megatron-core <= 0.16)
or ``mtp_model_layer`` (newer). All spellings are accepted when reading; the writer uses the
spelling megatron-core 0.16.1 writes itself.

Everything here works on *one layer at a time*, which is what keeps conversion streaming.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from megatron_ling.errors import LingConfigError
from megatron_ling.models.config import LingConfig

# Megatron suffix (inside one transformer layer) -> canonical role. First spelling is the one
# the writer uses (megatron-core 0.16.1 local spec).
_LAYER_ALIASES: dict[str, tuple[str, ...]] = {
    "input_norm": ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    "qkv": ("self_attention.linear_qkv.weight",),
    "proj": ("self_attention.linear_proj.weight",),
    "q_norm": ("self_attention.q_layernorm.weight",),
    "k_norm": ("self_attention.k_layernorm.weight",),
    "post_norm": ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
    # dense MLP
    "fc1": ("mlp.linear_fc1.weight",),
    "fc2": ("mlp.linear_fc2.weight",),
    # MoE
    "router": ("mlp.router.weight",),
    "expert_bias": ("mlp.router.expert_bias",),
    "experts_fc1": ("mlp.experts.experts.linear_fc1.weight", "mlp.experts.linear_fc1.weight"),
    "experts_fc2": ("mlp.experts.experts.linear_fc2.weight", "mlp.experts.linear_fc2.weight"),
    "shared_fc1": ("mlp.shared_experts.linear_fc1.weight",),
    "shared_fc2": ("mlp.shared_experts.linear_fc2.weight",),
}
_MTP_EXTRA = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "final_layernorm.weight")
MTP_INNER = ("transformer_layer", "mtp_model_layer")
GLOBAL_KEYS = {
    "embedding.word_embeddings.weight": "model.word_embeddings.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}

_SUFFIX_TO_ROLE = {s: role for role, spellings in _LAYER_ALIASES.items() for s in spellings}
_DECODER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_MTP_RE = re.compile(r"^mtp\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Slot:
    """Where a Megatron tensor belongs: ``unit`` is "embed", "final" (norm + lm_head), ("layer", i)
    for decoder layer i or ("mtp", j) for MTP layer j; ``role`` names the tensor inside it."""

    unit: object
    role: str


def classify(key: str) -> Slot | None:
    """Map a torch_dist tensor key to its Slot; None for keys that are not model weights
    (optimizer state, RNG state, ...). Raises LingConfigError for an unknown model key."""
    if key.startswith(("optimizer.", "rng_state", "rerun_state_machine")) or key.endswith("_extra_state"):
        return None
    if key in GLOBAL_KEYS:
        return Slot("embed" if key.startswith("embedding") else "final",
                    {"embedding.word_embeddings.weight": "embed", "decoder.final_layernorm.weight": "norm",
                     "output_layer.weight": "lm_head"}[key])
    m = _DECODER_RE.match(key)
    if m and m.group(2) in _SUFFIX_TO_ROLE:
        return Slot(("layer", int(m.group(1))), _SUFFIX_TO_ROLE[m.group(2)])
    m = _MTP_RE.match(key)
    if m:
        j, rest = int(m.group(1)), m.group(2)
        if rest in _MTP_EXTRA:
            return Slot(("mtp", j), rest[: -len(".weight")])
        for inner in MTP_INNER:
            if rest.startswith(inner + ".") and rest[len(inner) + 1:] in _SUFFIX_TO_ROLE:
                return Slot(("mtp", j), _SUFFIX_TO_ROLE[rest[len(inner) + 1:]])
    raise LingConfigError(f"checkpoint: unknown model tensor key {key!r}; megatron-ling converts Ling 2.0 "
                          f"(BailingMoeV2) models only - was this checkpoint written by another model?")


def megatron_key(unit, role: str, mtp_inner: str = "transformer_layer") -> str:
    """The key megatron-core 0.16.1 (local spec) writes for a Slot."""
    if unit == "embed":
        return "embedding.word_embeddings.weight"
    if unit == "final":
        return {"norm": "decoder.final_layernorm.weight", "lm_head": "output_layer.weight"}[role]
    kind, i = unit
    if kind == "layer":
        return f"decoder.layers.{i}.{_LAYER_ALIASES[role][0]}"
    if role in ("enorm", "hnorm", "eh_proj", "final_layernorm"):
        return f"mtp.layers.{i}.{role}.weight"
    return f"mtp.layers.{i}.{mtp_inner}.{_LAYER_ALIASES[role][0]}"


# ------------------------------------------------------------------------- expected shapes
def layer_roles(cfg: LingConfig, unit) -> list[str]:
    """Roles one unit holds, in the order they are converted."""
    if unit == "embed":
        return ["embed"]
    if unit == "final":
        return ["norm"] + ([] if cfg.tie_word_embeddings else ["lm_head"])
    kind, i = unit
    moe = kind == "mtp" or i >= cfg.first_k_dense_replace
    roles = ["input_norm", "qkv", "proj"] + (["q_norm", "k_norm"] if cfg.use_qk_norm else []) + ["post_norm"]
    if moe:
        roles += ["router"] + (["expert_bias"] if cfg.moe_router_enable_expert_bias else [])
        roles += ["experts_fc1", "experts_fc2"]
        if cfg.num_shared_experts:
            roles += ["shared_fc1", "shared_fc2"]
    else:
        roles += ["fc1", "fc2"]
    if kind == "mtp":
        roles = ["enorm", "hnorm", "eh_proj"] + roles + ["final_layernorm"]
    return roles


def megatron_shape(cfg: LingConfig, role: str) -> tuple[int, ...]:
    H, hd = cfg.hidden_size, cfg.head_dim
    E, f = cfg.num_experts, cfg.moe_intermediate_size
    fs = f * cfg.num_shared_experts
    return {
        "embed": (cfg.vocab_size, H), "lm_head": (cfg.vocab_size, H), "norm": (H,),
        "input_norm": (H,), "post_norm": (H,), "q_norm": (hd,), "k_norm": (hd,),
        "qkv": ((cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd, H),
        "proj": (H, cfg.num_attention_heads * hd),
        "fc1": (2 * cfg.intermediate_size, H), "fc2": (H, cfg.intermediate_size),
        "router": (E, H), "expert_bias": (E,),
        "experts_fc1": (E, 2 * f, H), "experts_fc2": (E, H, f),
        "shared_fc1": (2 * fs, H), "shared_fc2": (H, fs),
        "enorm": (H,), "hnorm": (H,), "eh_proj": (H, 2 * H), "final_layernorm": (H,),
    }[role]


def units(cfg: LingConfig, mtp: bool = True) -> list:
    """Conversion units in HF order: embeddings, decoder layers, MTP layers, final norm + head."""
    out = ["embed"] + [("layer", i) for i in range(cfg.num_hidden_layers)]
    if mtp:
        out += [("mtp", j) for j in range(cfg.num_nextn_predict_layers)]
    return out + ["final"]


# ----------------------------------------------------------------------------- HF names
def hf_prefix(cfg: LingConfig, unit) -> str:
    kind, i = unit
    return f"model.layers.{i if kind == 'layer' else cfg.num_hidden_layers + i}."


def hf_names(cfg: LingConfig, unit, role: str) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensor names (and shapes) that one Megatron role becomes, in order."""
    H = cfg.hidden_size
    if unit == "embed":
        return [("model.word_embeddings.weight", (cfg.vocab_size, H))]
    if unit == "final":
        return [({"norm": "model.norm.weight", "lm_head": "lm_head.weight"}[role], megatron_shape(cfg, role))]
    p = hf_prefix(cfg, unit)
    F, f = cfg.intermediate_size, cfg.moe_intermediate_size
    fs = f * cfg.num_shared_experts
    simple = {
        "input_norm": "input_layernorm.weight", "post_norm": "post_attention_layernorm.weight",
        "qkv": "attention.query_key_value.weight", "proj": "attention.dense.weight",
        "q_norm": "attention.query_layernorm.weight", "k_norm": "attention.key_layernorm.weight",
        "router": "mlp.gate.weight", "expert_bias": "mlp.gate.expert_bias",
        "enorm": "enorm.weight", "hnorm": "hnorm.weight", "eh_proj": "eh_proj.weight",
        "final_layernorm": "final_layernorm.weight",
    }
    if role in simple:
        return [(p + simple[role], megatron_shape(cfg, role))]
    if role == "fc1":
        return [(p + "mlp.gate_proj.weight", (F, H)), (p + "mlp.up_proj.weight", (F, H))]
    if role == "fc2":
        return [(p + "mlp.down_proj.weight", (H, F))]
    if role == "shared_fc1":
        return [(p + "mlp.shared_experts.gate_proj.weight", (fs, H)), (p + "mlp.shared_experts.up_proj.weight", (fs, H))]
    if role == "shared_fc2":
        return [(p + "mlp.shared_experts.down_proj.weight", (H, fs))]
    if role == "experts_fc1":
        return [(p + f"mlp.experts.{e}.{w}.weight", (f, H))
                for e in range(cfg.num_experts) for w in ("gate_proj", "up_proj")]
    if role == "experts_fc2":
        return [(p + f"mlp.experts.{e}.down_proj.weight", (H, f)) for e in range(cfg.num_experts)]
    raise KeyError(role)


# ------------------------------------------------------------------------- tensor layouts
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


def role_to_hf(cfg: LingConfig, role: str, t: torch.Tensor) -> list[torch.Tensor]:
    """One Megatron tensor -> its HF tensor(s), in the order of ``hf_names``."""
    if role == "qkv":
        return [qkv_megatron_to_hf(t, cfg)]
    if role in ("fc1", "shared_fc1"):
        return list(torch.chunk(t, 2, 0))
    if role == "experts_fc1":
        out = []
        for e in range(t.shape[0]):
            out += list(torch.chunk(t[e], 2, 0))
        return out
    if role == "experts_fc2":
        return list(t.unbind(0))
    return [t]


def role_chunks_from_hf(cfg: LingConfig, role: str, ts: list[torch.Tensor]):
    """``role_from_hf`` as (offsets, tensor) chunks of the global Megatron tensor, without
    concatenating: [gate; up] halves become two chunks (as megatron itself saves SwiGLU fc1), each
    expert its own chunk(s) on the expert axis."""
    if role in ("fc1", "shared_fc1"):
        return [((0, 0), ts[0]), ((ts[0].shape[0], 0), ts[1])]
    if role == "experts_fc1":
        f = ts[0].shape[0]
        return (((e // 2, (e % 2) * f, 0), t.unsqueeze(0)) for e, t in enumerate(ts))
    if role == "experts_fc2":
        return (((e, 0, 0), t.unsqueeze(0)) for e, t in enumerate(ts))
    t = role_from_hf(cfg, role, ts)
    return [((0,) * t.dim(), t)]


def role_from_hf(cfg: LingConfig, role: str, ts: list[torch.Tensor], stack: bool = True):
    """Inverse of ``role_to_hf``. For expert roles with ``stack=False``: the list of per-expert
    Megatron tensors, made one at a time (the global ``[E, ...]`` tensor is never materialised)."""
    if role == "qkv":
        return qkv_hf_to_megatron(ts[0], cfg)
    if role in ("fc1", "shared_fc1"):
        return torch.cat(ts, 0)
    if role == "experts_fc1":
        experts = (torch.cat(ts[2 * e: 2 * e + 2], 0) for e in range(len(ts) // 2))
        return torch.stack(list(experts)) if stack else experts
    if role == "experts_fc2":
        return torch.stack(ts) if stack else list(ts)
    return ts[0]
