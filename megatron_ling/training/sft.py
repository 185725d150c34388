"""SFT forward step over chat samples (megatron_ling.data.packing): per-conversation attention,
assistant-only loss with a chosen normalisation.

Two attention paths, chosen per process:

* Transformer Engine on CUDA (``thd_available()``): the micro-batch [b, s] is flattened to one
  THD sequence of b*s tokens and handed to GPTModel as ``PackedSeqParams(qkv_format="thd")`` with
  cu_seqlens at every conversation (and padding) boundary; TE's fused attention and megatron's THD
  RoPE restart at each boundary. Not exercised by the CPU test suite (no TE / GPU there).
* Otherwise (CPU, local specs): an explicit [b, 1, s, s] mask (True = masked) that is causal and
  block-diagonal by ``doc_ids``. RoPE is left as megatron-core computes it, at positions 0..s-1 of
  the packed sequence (GPTModel ignores ``position_ids`` for RoPE: gpt_model.py:361-368 in 0.16.1,
  :406-411 in 0.19.2): a rotary score q_m . k_n depends on m - n only, and with attention inside a
  conversation only, a conversation's offset in the sequence cancels. The packing-exactness test
  holds this to 1e-5 (tests/test_sft.py).

Z-loss (and the router's other per-token statistics: aux loss, expert-bias token counts) covers
the tokens in the loss only: positions outside the assistant mask go to GPTModel as megatron-core's
``padding_mask`` (moe/router.py:471-500, moe_utils.py:136-165), whose z-loss under
``calculate_per_token_loss`` is the sum over those tokens, divided in finalize_model_grads by the same
global denominator as the lm loss. It is therefore the same with and without packing (padding and
prompts are never counted) and, with token normalisation, the mean over assistant tokens.

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
    """Megatron-core's THD attention can run here (else the explicit-mask path)."""
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
    outside = b["loss_mask"] == 0  # megatron's padding_mask: the router's z-loss skips these tokens
    if thd_available():
        psp = packed_seq_params(doc)
        output = model(tokens.reshape(1, -1), pos.reshape(1, -1), attention_mask=None, labels=labels.reshape(1, -1),
                       loss_mask=weight.reshape(1, -1), packed_seq_params=psp, padding_mask=outside.reshape(1, -1))
    else:
        output = model(tokens, pos, attention_mask=document_attention_mask(doc), labels=labels, loss_mask=weight,
                       padding_mask=outside)
    return output, partial(loss_func, b["loss_mask"], weight)
