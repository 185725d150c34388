"""Ling 2.0 architecture config: the single source of truth for model shape.

Field names are those of Hugging Face ``BailingMoeV2Config`` (config.json), so the HF round trip
is a plain dict copy plus a few derived fields. Megatron-Core's ``TransformerConfig`` is derived
from this (see ``megatron_ling.models.megatron_config``), never the other way round.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_ling.errors import LingConfigError

# HF config.json keys that exist only for inference engines / HF bookkeeping. They are kept in
# ``LingConfig.extra`` on import so that an exported config.json carries them unchanged.
HF_ARCHITECTURE = "BailingMoeV2ForCausalLM"
HF_MODEL_TYPE = "bailing_moe_v2"
# rope_scaling keys of transformers' YaRN (modeling_rope_utils._compute_yarn_parameters)
YARN_KEYS = frozenset({"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast",
                       "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"})


@dataclass
class LingConfig:
    """Architecture of a Ling 2.0 (BailingMoeV2) model. Names follow HF config.json."""

    vocab_size: int = 157184
    hidden_size: int = 2048
    intermediate_size: int = 5120  # dense-layer FFN width
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 128
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    use_bias: bool = False
    use_qkv_bias: bool = False
    use_qk_norm: bool = True
    max_position_embeddings: int = 32768
    rope_theta: float = 600000.0
    partial_rotary_factor: float = 0.5
    # HF rope_scaling: None (plain RoPE) or a YaRN dict, how Ling reaches 128K (see yarn_params)
    rope_scaling: Optional[dict] = None
    initializer_range: float = 0.006
    # MoE
    num_experts: int = 256
    num_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    moe_intermediate_size: int = 512
    first_k_dense_replace: int = 1
    routed_scaling_factor: float = 2.5
    score_function: str = "sigmoid"
    norm_topk_prob: bool = True
    moe_router_enable_expert_bias: bool = True
    router_dtype: str = "fp32"
    # Multi-token prediction
    num_nextn_predict_layers: int = 1
    mtp_loss_scaling_factor: float = 0.1
    # Special tokens (Ling: eos == pad)
    eos_token_id: int = 156892
    pad_token_id: int = 156892
    # Unknown config.json keys carried through a round trip untouched.
    extra: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ derived
    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def rotary_dim(self) -> int:
        return int(round(self.head_dim * self.partial_rotary_factor))

    @property
    def moe_layer_freq(self) -> list[int]:
        """Megatron's per-layer MoE pattern: first k dense (0), the rest MoE (1)."""
        k = self.first_k_dense_replace
        return [0] * k + [1] * (self.num_hidden_layers - k)

    # --------------------------------------------------------------- validation
    def validate(self, prefix: str = "model") -> "LingConfig":
        """Raise LingConfigError (one line, naming the field and the fix) on an invalid shape."""

        def bad(name, msg):
            raise LingConfigError(f"{prefix}.{name}: {msg}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                bad(name, f"must be a positive integer, got {getattr(self, name)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", f"{self.num_attention_heads} attention heads are not divisible "
                f"by {self.num_key_value_heads} KV heads (GQA groups); pick a divisor of num_attention_heads")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            bad("first_k_dense_replace", f"must be in [0, num_hidden_layers={self.num_hidden_layers}], "
                f"got {self.first_k_dense_replace}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            bad("partial_rotary_factor", f"must be in (0, 1], got {self.partial_rotary_factor}")
        if self.rotary_dim % 2:
            bad("partial_rotary_factor", f"head_dim*partial_rotary_factor={self.rotary_dim} must be even")
        if self.hidden_act != "silu":
            bad("hidden_act", f"Ling uses SwiGLU ('silu'), got {self.hidden_act!r}")
        if self.use_bias or self.use_qkv_bias:
            bad("use_bias", "Ling has no linear biases; set use_bias=false and use_qkv_bias=false")
        if self.score_function != "sigmoid":
            bad("score_function", f"Ling routes with 'sigmoid' scores, got {self.score_function!r}")
        if self.router_dtype != "fp32":
            bad("router_dtype", f"the router and expert bias must be fp32, got {self.router_dtype!r}")
        if self.num_moe_layers > 0:
            if self.num_experts <= 0:
                bad("num_experts", "MoE layers need num_experts > 0")
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                bad("num_experts_per_tok", f"must be in [1, num_experts={self.num_experts}]")
            if self.n_group > 1:
                if self.num_experts % self.n_group:
                    bad("n_group", f"num_experts={self.num_experts} is not divisible by n_group={self.n_group}")
                if not 0 < self.topk_group <= self.n_group:
                    bad("topk_group", f"must be in [1, n_group={self.n_group}], got {self.topk_group}")
                if self.num_experts_per_tok % self.topk_group:
                    bad("num_experts_per_tok", f"{self.num_experts_per_tok} is not divisible by "
                        f"topk_group={self.topk_group} (Megatron scores a group by its top k/topk_group)")
                per_group = self.num_experts // self.n_group
                if self.num_experts_per_tok // self.topk_group > per_group:
                    bad("num_experts_per_tok", f"needs {self.num_experts_per_tok // self.topk_group} experts per "
                        f"group but groups have {per_group}")
            if self.moe_intermediate_size <= 0:
                bad("moe_intermediate_size", "must be positive")
        if self.num_nextn_predict_layers < 0:
            bad("num_nextn_predict_layers", "must be >= 0")
        if self.rope_scaling is not None:
            self.yarn_params(prefix)
        return self

    def yarn_params(self, prefix: str = "model") -> Optional[dict]:
        """HF ``rope_scaling`` (transformers' ``_compute_yarn_parameters`` semantics) as the
        arguments of megatron-core's YarnRotaryEmbedding; None without scaling. Only YaRN is
        implemented; any other type, or a key we do not honour, is refused."""
        rs = self.rope_scaling
        if rs is None:
            return None
        field_ = f"{prefix}.rope_scaling"
        if not isinstance(rs, dict):
            raise LingConfigError(f"{field_}: expected a mapping such as {{type: yarn, factor: 4.0, "
                                  f"original_max_position_embeddings: 32768}} or null, got {rs!r}")
        kind = rs.get("rope_type", rs.get("type"))
        if kind != "yarn":
            raise LingConfigError(f"{field_}: rope scaling type {kind!r} is not supported; only 'yarn' is "
                                  f"implemented (or set rope_scaling to null)")
        unknown = sorted(set(rs) - YARN_KEYS)
        if unknown:
            raise LingConfigError(f"{field_}.{unknown[0]}: not a YaRN parameter megatron-ling honours; "
                                  f"use only {', '.join(sorted(YARN_KEYS))}")

        def num(key, default, lo, hi=float("inf")):
            v = rs.get(key)
            if v is None:
                return default
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo < v < hi:
                raise LingConfigError(f"{field_}.{key}: must be a number in ({lo}, {hi}), got {v!r}")
            return float(v)

        orig = rs.get("original_max_position_embeddings", self.max_position_embeddings)
        if isinstance(orig, bool) or not isinstance(orig, int) or orig < 1:
            raise LingConfigError(f"{field_}.original_max_position_embeddings: must be a positive integer, "
                                  f"got {orig!r}")
        # transformers: a missing factor is max_position_embeddings / original_max_position_embeddings
        factor = num("factor", self.max_position_embeddings / orig, 0.0)
        if factor <= 1.0:
            raise LingConfigError(f"{field_}.factor: YaRN needs a factor > 1 (got {factor}); "
                                  f"set rope_scaling to null for plain RoPE")
        truncate = rs.get("truncate", True)
        if not isinstance(truncate, bool):
            raise LingConfigError(f"{field_}.truncate: must be true or false, got {truncate!r}")
        # transformers treats a zero/absent beta as its default ("or 32" / "or 1").
        beta_fast = num("beta_fast", 0.0, -float("inf")) or 32.0
        beta_slow = num("beta_slow", 0.0, -float("inf")) or 1.0
        # Attention (concentration) factor, multiplied into cos and sin of q and k by both
        # transformers and megatron-core (attention.py, apply_rotary_pos_emb(mscale=...)). They
        # differ in how they derive it: transformers takes ``attention_factor`` if given, else
        # mscale(f, mscale)/mscale(f, mscale_all_dim) only when BOTH are non-zero, else
        # mscale(f) = 0.1 ln f + 1; megatron-core's _yarn_get_concentration_factor uses the ratio
        # whenever neither is None (mscale_all_dim=0 gives mscale(f, mscale)/1). Map the HF
        # definition onto megatron-core's arguments so both compute the same factor.
        af = num("attention_factor", None, 0.0)
        mscale = num("mscale", None, -float("inf"))
        mscale_all_dim = num("mscale_all_dim", None, -float("inf"))
        if af is not None:  # 0.1 * m * ln f + 1 = af, over mscale(f, 0) = 1
            mscale, mscale_all_dim = (af - 1.0) / (0.1 * math.log(factor)), 0.0
        elif not (mscale and mscale_all_dim):
            mscale = mscale_all_dim = None  # megatron-core: mscale(f)
        return dict(scaling_factor=factor, original_max_position_embeddings=orig, beta_fast=beta_fast,
                    beta_slow=beta_slow, mscale=mscale, mscale_all_dim=mscale_all_dim,
                    correction_range_round_to_int=truncate)

    # ------------------------------------------------------------------- HF I/O
    def to_hf_dict(self) -> dict[str, Any]:
        """config.json content for BailingMoeV2ForCausalLM."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update(
            architectures=[HF_ARCHITECTURE],
            model_type=HF_MODEL_TYPE,
            rotary_dim=self.rotary_dim,
            moe_shared_expert_intermediate_size=self.moe_intermediate_size * self.num_shared_experts,
        )
        out = copy.deepcopy(self.extra)
        out.update(d)
        return out

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "LingConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kw = {k: d.pop(k) for k in list(d) if k in known}
        # Ling-1T states half-RoPE as rotary_dim instead of partial_rotary_factor.
        rd = d.pop("rotary_dim", None)
        if rd and "partial_rotary_factor" not in kw:
            kw["partial_rotary_factor"] = float(rd) / kw.get("head_dim", cls.head_dim)
        if kw.get("head_dim") is None and "hidden_size" in kw and "num_attention_heads" in kw:
            kw["head_dim"] = kw["hidden_size"] // kw["num_attention_heads"]
        # eos/pad may be lists in some HF configs
        for k in ("eos_token_id", "pad_token_id"):
            if isinstance(kw.get(k), list):
                kw[k] = kw[k][0]
        # derived keys that to_hf_dict writes again (torch_dtype stays in extra: the converter sets it)
        for k in ("moe_shared_expert_intermediate_size", "architectures", "model_type"):
            d.pop(k, None)
        return cls(**kw, extra=d)

    def save_hf_config(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_hf_config(cls, path: str) -> "LingConfig":
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise LingConfigError(f"config.json not found at {path}: pass an HF model directory")
        with open(path) as f:
            return cls.from_hf_dict(json.load(f))

    def replace(self, **kw) -> "LingConfig":
        unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise LingConfigError(f"model.{sorted(unknown)[0]}: unknown Ling config field; "
                                  f"valid fields are those of HF BailingMoeV2 config.json")
        return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------- presets
_MINI = LingConfig()
PRESETS: dict[str, LingConfig] = {
    # FACTS §1. Published totals exclude the MTP layer.
    "ling-mini-2.0": _MINI,
    "ling-flash-2.0": _MINI.replace(
        hidden_size=4096, intermediate_size=9216, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=4, moe_intermediate_size=1024),
    "ling-1t": _MINI.replace(
        hidden_size=8192, intermediate_size=18432, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, moe_intermediate_size=2048, first_k_dense_replace=4),
    # CPU presets: every Ling feature (dense-first, shared expert, group routing with
    # top_k = 2*topk_group so HF and Megatron group scores agree, MTP, QK-norm, partial RoPE, GQA).
    "ling-tiny": _MINI.replace(
        vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
        moe_intermediate_size=32, n_group=4, topk_group=2, num_experts_per_tok=4,
        max_position_embeddings=512, rope_theta=10000.0, initializer_range=0.02,
        eos_token_id=0, pad_token_id=0),
    "ling-small": _MINI.replace(
        vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, num_experts=16,
        moe_intermediate_size=128, n_group=4, topk_group=2, num_experts_per_tok=4,
        max_position_embeddings=2048, rope_theta=10000.0, initializer_range=0.02,
        eos_token_id=0, pad_token_id=0),
}


def get_preset(name: str, **overrides) -> LingConfig:
    if name not in PRESETS:
        raise LingConfigError(f"model.preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else copy.deepcopy(PRESETS[name])
