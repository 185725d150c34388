"""Analytic parameter counts for Ling 2.0 (total / active, with or without embeddings and MTP).

Counts what Megatron builds: every weight matrix and norm weight; the expert bias is a buffer and
is not a parameter. For the small presets the count equals ``sum(p.numel())`` of the built model
exactly (tested); for the released models it reproduces the published figures (tested).
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_ling.models.config import LingConfig


@dataclass(frozen=True)
class ParamCount:
    total: int
    active: int
    embedding: int  # input embedding + output layer (untied)

    @property
    def total_non_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding


def _attention(c: LingConfig) -> int:
    qkv = c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    proj = c.num_attention_heads * c.head_dim * c.hidden_size
    qk_norm = 2 * c.head_dim if c.use_qk_norm else 0
    return qkv + proj + qk_norm


def _layer(c: LingConfig, moe: bool) -> tuple[int, int]:
    """(total, active) parameters of one decoder layer, its two RMSNorms included."""
    norms = 2 * c.hidden_size
    attn = _attention(c)
    if not moe:
        mlp = 3 * c.hidden_size * c.intermediate_size
        return norms + attn + mlp, norms + attn + mlp
    expert = 3 * c.hidden_size * c.moe_intermediate_size
    router = c.num_experts * c.hidden_size
    shared = c.num_shared_experts * expert
    total = norms + attn + c.num_experts * expert + shared + router
    active = norms + attn + c.num_experts_per_tok * expert + shared + router
    return total, active


def mtp_layer_params(c: LingConfig) -> tuple[int, int]:
    """One MTP layer: enorm, hnorm, eh_proj [H, 2H], a MoE decoder layer, final norm.
    It shares the main model's embedding and output layer."""
    t, a = _layer(c, moe=True)
    extra = 2 * c.hidden_size + 2 * c.hidden_size * c.hidden_size + c.hidden_size
    return t + extra, a + extra


def count_parameters(c: LingConfig, include_mtp: bool = False) -> ParamCount:
    emb = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    total = active = emb + c.hidden_size  # + final norm
    for i in range(c.num_hidden_layers):
        t, a = _layer(c, moe=i >= c.first_k_dense_replace)
        total, active = total + t, active + a
    if include_mtp:
        for _ in range(c.num_nextn_predict_layers):
            t, a = mtp_layer_params(c)
            total, active = total + t, active + a
    return ParamCount(total=total, active=active, embedding=emb)


def format_count(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}" if n / div < 100 else f"{n / div:.1f}{unit}"
    return str(n)
