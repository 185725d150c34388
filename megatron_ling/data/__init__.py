"""Data for megatron-ling: DataConfig, tokenizers, the built-in corpus, ling-preprocess and
megatron.core datasets with padding handled by position (Ling's pad == eos).

Names are imported lazily: DataConfig validation must stay cheap (no megatron.core import).
"""
from megatron_ling.data.config import DataConfig  # noqa: F401

_LAZY = {
    "load_tokenizer": "megatron_ling.data.tokenizer",
    "LingTokenizer": "megatron_ling.data.tokenizer",
    "preprocess": "megatron_ling.data.preprocess",
    "write_corpus": "megatron_ling.data.corpus",
    "build_datasets": "megatron_ling.data.datasets",
    "prepare_quickstart_data": "megatron_ling.data.datasets",
    "resolve_data_config": "megatron_ling.data.datasets",
    "get_batch_iterator": "megatron_ling.data.datasets",
    "LingGPTDataset": "megatron_ling.data.datasets",
    "random_microbatch": "megatron_ling.data.random_batches",
}

__all__ = ["DataConfig", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megatron_ling.data' has no attribute {name!r}")
