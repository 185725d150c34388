"""The one random micro-batch maker: uniform random tokens in the trainer's micro-batch format
(``tokens``, ``labels`` shifted by one, ``loss_mask``, ``position_ids``), for runs that need
batches without a dataset (the fidelity suite, the profiler's calibration and measured runs,
``bench/``). Each micro-batch comes from its own seed, so a global batch splits over data-parallel
ranks without changing any micro-batch."""
from __future__ import annotations

import torch


def random_microbatch(seed: int, micro_batch_size: int, seq_length: int, vocab_size: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab_size, (micro_batch_size, seq_length + 1), generator=g)
    return dict(tokens=t[:, :-1].contiguous(), labels=t[:, 1:].contiguous(),
                loss_mask=torch.ones(micro_batch_size, seq_length),
                position_ids=torch.arange(seq_length).unsqueeze(0).expand(micro_batch_size, -1).contiguous())
