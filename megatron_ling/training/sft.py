"""SFT forward step over chat samples (megatron_ling.data.packing): per-conversation attention,
per-conversation RoPE positions, assistant-only loss with a chosen normalisation.

Two attention paths, chosen per process:

* Transformer Engine on CUDA (``thd_available()``): the micro-batch [b, s] is flattened to one
  THD sequence of b*s tokens and handed to GPTModel as ``PackedSeqParams(qkv_format="thd")`` with
  cu_seqlens at every conversation (and padding) boundary; TE's fused attention and megatron's THD
  RoPE restart at each boundary. Not exercised by the CPU test suite (no TE / GPU there).
* Otherwise (CPU, local specs): an explicit [b, 1, s, s] mask (True = masked) that is causal and
  block-diagonal by ``doc_ids``, and RoPE angles gathered by ``position_ids``: megatron-core's
  GPTModel computes RoPE for positions 0..s-1 from the sequence length alone and ignores
  ``position_ids`` (megatron/core/models/gpt/gpt_model.py:361-368, 0.16.1), so
  ``install_document_rope`` wraps each chunk's RotaryEmbedding to index its table by the positions
  of the micro-batch being run.

Loss normalisation: ``loss_func`` returns (sum of loss x loss_weight, round(sum of loss_weight)); the
trainer sets ``calculate_per_token_loss`` so megatron's schedule sums these over micro-batches and
finalize_model_grads divides the gradients by the global-batch total (schedules.py:257-263, 680-685).
With weights 1 per assistant token that is the mean over every assistant token of the global
batch; with weights 1/n_c it is the mean over conversations. The logged "lm loss" is always the
assistant-token mean.
"""
from __future__ import annotations

from functools import partial

import torch


def thd_available() -> bool:
    from megatron_ling.models.megatron_config import te_available

    return te_available() and torch.cuda.is_available()


def document_attention_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] bool, True where attention is not allowed: a later position or another document."""
    s = doc_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return ~(same & causal).unsqueeze(1)


def packed_seq_params(doc_ids: torch.Tensor):
    """PackedSeqParams (THD) for the flattened micro-batch: one sequence per run of equal doc ids."""
    from megatron.core.packed_seq_params import PackedSeqParams

    flat = doc_ids.reshape(-1)
    # a boundary wherever the doc id changes, and between samples of the micro-batch
    change = torch.ones_like(flat, dtype=torch.bool)
    change[1:] = flat[1:] != flat[:-1]
    change[:: doc_ids.shape[-1]] = True
    starts = torch.nonzero(change).reshape(-1)
    cu = torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len,
                           max_seqlen_kv=max_len)


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def install_document_rope(chunks) -> None:
    """Make every chunk's RoPE follow the positions set by ``chat_forward_step`` (CPU path)."""
    for c in chunks:
        rope = getattr(_unwrap(c), "rotary_pos_emb", None)
        if rope is None or getattr(rope, "ling_positions", False) is not False:
            continue
        table = rope.forward  # the class's lru-cached forward, bound

        def forward(max_seq_len, *args, _table=table, _rope=rope, **kwargs):
            emb = _table(max_seq_len, *args, **kwargs)  # [s, 1, 1, d] for positions 0..s-1
            pos = _rope.ling_positions
            if pos is None:
                return emb
            return emb[:, 0, 0, :][pos.t()].unsqueeze(2)  # [s, b, 1, d]: angles of each sample's positions

        rope.forward = forward
        rope.ling_positions = None


def loss_func(loss_mask: torch.Tensor, loss_weight: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float().reshape(-1)
    w = loss_weight.reshape(-1).float()
    m = loss_mask.reshape(-1).float()
    loss = torch.sum(losses * w)
    denom = torch.round(w.sum()).to(torch.int)  # tokens, or conversations (weights 1/n_c sum to 1 each)
    report = torch.stack([torch.sum(losses * m).detach(), m.sum().detach()])
    objective = torch.stack([loss.detach(), denom.detach().float()])  # what the gradients follow
    return loss, denom, {"lm loss": report, "sft objective": objective}


def chat_forward_step(data_iterator, model):
    """Megatron forward_step_func for chat samples (see the module docstring)."""
    batch = next(data_iterator)
    dev = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    b = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
    tokens, labels, pos, weight, doc = b["tokens"], b["labels"], b["position_ids"], b["loss_weight"], b["doc_ids"]
    if thd_available():
        psp = packed_seq_params(doc)
        output = model(tokens.reshape(1, -1), pos.reshape(1, -1), attention_mask=None, labels=labels.reshape(1, -1),
                       loss_mask=weight.reshape(1, -1), packed_seq_params=psp)
    else:
        rope = getattr(_unwrap(model), "rotary_pos_emb", None)
        if rope is not None:
            rope.ling_positions = pos
        try:
            output = model(tokens, pos, attention_mask=document_attention_mask(doc), labels=labels, loss_mask=weight)
        finally:
            if rope is not None:
                rope.ling_positions = None
    return output, partial(loss_func, b["loss_mask"], weight)
