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
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_ling.config_utils import check_fields, coerce_field, read_json, spec
from megatron_ling.errors import LingConfigError

HF_ARCHITECTURE = "BailingMoeV2ForCausalLM"
HF_MODEL_TYPE = "bailing_moe_v2"
# Every config.json key is honoured (a LingConfig field), derived (checked against the fields) or
# one of these, kept in ``LingConfig.extra`` so an exported config.json carries it unchanged; any
# other key is refused (tests/test_hf_config_fields.py enumerates the real config's fields).
HF_METADATA = {
    "architectures": "HF class name; export writes BailingMoeV2ForCausalLM",
    "model_type": "HF registry name; export writes bailing_moe_v2",
    "auto_map": "remote-code class paths for transformers (inference only)",
    "torch_dtype": "storage dtype of the safetensors (set by ling-convert); training uses model.precision",
    "dtype": "storage dtype of the safetensors (transformers 5 spelling of torch_dtype)",
    "transformers_version": "version of transformers that wrote the file",
    "use_cache": "KV cache switch of HF generation; training keeps no cache",
    "output_router_logits": "whether the HF forward returns router logits (an output option)",
    "max_window_layers": "BailingMoeV2 has no sliding-window attention; the value is read by nothing",
    "quantization_config": "FP8 storage description written and read by ling-convert",
    "bos_token_id": "special token id for generation; training data comes from the tokenizer",
}
# HF keys megatron-ling implements at one value only (released Ling configs carry them at it): any
# other value is refused in one line. key -> (the value, what megatron-ling builds)
HF_FIXED = {
    # Ling trains without dropout (megatron-ling builds hidden/attention dropout 0)
    "embedding_dropout": (0.0, "no embedding dropout"),
    "attention_dropout": (0.0, "no attention dropout"),
    "output_dropout": (0.0, "no hidden dropout"),
    "use_rmsnorm": (True, "RMSNorm everywhere (megatron normalization='RMSNorm')"),
    "norm_head": (False, "an unnormalised output layer"),
    "norm_softmax": (False, "plain softmax attention"),
    "using_split_qkv_in_self_attention": (False, "the fused query_key_value projection"),
}
# rope_scaling keys of transformers' YaRN (modeling_rope_utils._compute_yarn_parameters)
YARN_KEYS = frozenset({"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast",
                       "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"})


@dataclass
class LingConfig:
    """Architecture of a Ling 2.0 (BailingMoeV2) model. Names follow HF config.json."""

    vocab_size: int = spec(157184, ">= 1")
    hidden_size: int = spec(2048, ">= 1")
    intermediate_size: int = spec(5120, ">= 1")  # dense-layer FFN width
    num_hidden_layers: int = spec(20, ">= 1")
    num_attention_heads: int = spec(16, ">= 1")
    num_key_value_heads: int = spec(4, ">= 1")
    head_dim: int = spec(128, ">= 1")
    hidden_act: str = "silu"
    rms_norm_eps: float = spec(1e-6, "> 0")
    tie_word_embeddings: bool = False
    use_bias: bool = False
    use_qkv_bias: bool = False
    use_qk_norm: bool = True
    max_position_embeddings: int = spec(32768, ">= 1")
    rope_theta: float = spec(600000.0, "> 1")
    partial_rotary_factor: float = spec(0.5, "(0, 1]")
    # HF rope_scaling: None (plain RoPE) or a YaRN dict, how Ling reaches 128K (see yarn_params)
    rope_scaling: Optional[dict] = None
    initializer_range: float = spec(0.006, "> 0")
    # MoE
    num_experts: int = spec(256, ">= 0")
    num_shared_experts: int = spec(1, ">= 0")
    num_experts_per_tok: int = spec(8, ">= 1")
    n_group: int = spec(8, ">= 1")
    topk_group: int = spec(4, ">= 1")
    moe_intermediate_size: int = spec(512, ">= 1")
    first_k_dense_replace: int = spec(1, ">= 0")
    routed_scaling_factor: float = spec(2.5, "> 0")
    score_function: str = "sigmoid"
    norm_topk_prob: bool = True
    moe_router_enable_expert_bias: bool = True
    router_dtype: str = "fp32"
    # Multi-token prediction
    num_nextn_predict_layers: int = spec(1, ">= 0")
    mtp_loss_scaling_factor: float = spec(0.1, ">= 0")
    # Special tokens (Ling: eos == pad)
    eos_token_id: int = spec(156892, ">= 0")
    pad_token_id: int = spec(156892, ">= 0")
    # HF_METADATA keys of config.json, carried through a round trip untouched.
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

        check_fields(self, prefix)

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
        if not self.norm_topk_prob:
            bad("norm_topk_prob", "megatron-core's sigmoid router always normalises the top-k weights; "
                "set norm_topk_prob=true")
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
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "LingConfig":
        """Read an HF config.json mapping; a key that is neither honoured nor metadata is refused."""
        if not isinstance(d, dict):
            raise LingConfigError(f"{source}: expected a JSON object of BailingMoeV2 config fields, "
                                  f"got {type(d).__name__}")
        d = dict(d)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        kw = {k: d.pop(k) for k in list(d) if k in fields}
        # Ling-1T states half-RoPE as rotary_dim instead of partial_rotary_factor.
        rd = d.pop("rotary_dim", None)
        if kw.get("head_dim") is None and "hidden_size" in kw and "num_attention_heads" in kw:
            kw["head_dim"] = kw["hidden_size"] // kw["num_attention_heads"]
        # eos/pad may be lists in some HF configs
        for k in ("eos_token_id", "pad_token_id"):
            if isinstance(kw.get(k), list) and kw[k]:
                kw[k] = kw[k][0]
        hints = typing.get_type_hints(cls)
        kw = {k: coerce_field(v, hints[k], f"{source}: {k}") for k, v in kw.items()}
        if rd and "partial_rotary_factor" not in kw:
            rd = coerce_field(rd, int, f"{source}: rotary_dim")
            kw["partial_rotary_factor"] = float(rd) / kw.get("head_dim", cls.head_dim)
        shared = d.pop("moe_shared_expert_intermediate_size", None)
        for k in ("architectures", "model_type"):  # to_hf_dict writes them again
            d.pop(k, None)
        for k, (want, builds) in HF_FIXED.items():
            v = d.pop(k, want)
            same_kind = isinstance(v, bool) == isinstance(want, bool)  # JSON true is not 1.0
            if v is not None and not (same_kind and v == want):
                raise LingConfigError(f"{source}: {k}={v!r}: megatron-ling builds {builds} only; "
                                      f"set {k} to {json.dumps(want)} or remove it")
        unknown = sorted(set(d) - set(HF_METADATA))
        if unknown:
            raise LingConfigError(f"{source}: {unknown[0]}: not a BailingMoeV2 field megatron-ling honours; "
                                  f"remove it (known fields: LingConfig's, rotary_dim, "
                                  f"moe_shared_expert_intermediate_size and {', '.join(sorted(HF_METADATA))})")
        cfg = cls(**kw, extra=d)
        if shared is not None and shared != cfg.moe_intermediate_size * cfg.num_shared_experts:
            raise LingConfigError(f"{source}: moe_shared_expert_intermediate_size={shared!r} is not "
                                  f"num_shared_experts x moe_intermediate_size = "
                                  f"{cfg.moe_intermediate_size * cfg.num_shared_experts}; fix one of them")
        return cfg

    def save_hf_config(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_hf_config(cls, path: str) -> "LingConfig":
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        return cls.from_hf_dict(read_json(path, "config.json"), source=path)

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
