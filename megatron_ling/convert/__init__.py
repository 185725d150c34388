"""Megatron-Core torch_dist <-> Hugging Face BailingMoeV2 conversion (``ling-convert``)."""
from __future__ import annotations


def to_hf(*args, **kwargs):
    from megatron_ling.convert.to_hf import to_hf as f

    return f(*args, **kwargs)


def from_hf(*args, **kwargs):
    from megatron_ling.convert.from_hf import from_hf as f

    return f(*args, **kwargs)


def verify(*args, **kwargs):
    from megatron_ling.convert.verify import verify as f

    return f(*args, **kwargs)


__all__ = ["to_hf", "from_hf", "verify"]
