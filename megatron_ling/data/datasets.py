"""Datasets for training: megatron.core's BlendedMegatronDatasetBuilder over GPTDataset, with
padding handled by position (Ling's pad == eos), the quick-start corpus, and a deterministic,
resumable micro-batch iterator.

Order of calls in a trainer (every rank):
    cfg = resolve_data_config(recipe.data)        # no process group needed; builds the quick start
    tok = load_tokenizer(cfg.tokenizer, cfg.cache_dir)
    ... torch.distributed.init_process_group(...)
    train, valid, test = build_datasets(cfg, tok, seq_length, (n_train, n_valid, n_test))
    it = get_batch_iterator(train, micro_batch_size, consumed_samples, dp_rank, dp_size)
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Iterator, Sequence

import numpy
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset, _get_ltor_masks_and_position_ids

from megatron_ling.data.config import DataConfig
from megatron_ling.errors import LingConfigError

# Appended by megatron after the real tokens of a short sample (see LingGPTDataset). Token ids
# stored by ling-preprocess are >= 0 (uint16/int32 of tokenizer ids), so -1 marks padding only.
_PAD_SENTINEL = -1

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask", "loss_weight", "doc_ids")


class LingGPTDataset(GPTDataset):
    """GPTDataset whose loss mask for padding is decided by position, never by token id.

    Why: stock megatron-core 0.16.1 decides padding by id. GPTDataset.__getitem__ masks
    ``loss_mask[labels == self._pad_token_id] = 0`` and rewrites those ids to 0
    (megatron/core/datasets/gpt_dataset.py:271-276). With Ling's tokenizer pad == eos, so
    that would drop every EOS from the loss; MegatronDataset.__init__ therefore swaps the pad
    id for -1 on a collision, unless allow_ambiguous_pad_tokens is set, with a warning
    (megatron/core/datasets/megatron_dataset.py:73-107). Here the rule is explicit and
    independent of that heuristic: the tail that _query_document_sample_shuffle_indices
    appends to short samples (gpt_dataset.py:368-374) is the only padding; its positions get
    loss_mask 0 and the tokenizer's pad id (a real embedding row) as token/label, and every
    real token, EOS included, keeps its loss (unless eod_mask_loss asks otherwise).
    """

    def __init__(self, *args, **kwargs):
        with warnings.catch_warnings():
            # The pad/eod collision warning is moot: padding is handled by position below.
            warnings.filterwarnings("ignore", message="The pad token id in the tokenizer collides")
            super().__init__(*args, **kwargs)
        self._pad_token_id = _PAD_SENTINEL

    def __getitem__(self, idx):
        # [0]: megatron-core 0.16.1 returns (tokens, document ids), 0.19 adds the document lengths
        text = self._query_document_sample_shuffle_indices(0 if idx is None else idx)[0]
        pad = text == _PAD_SENTINEL
        n_real = int(numpy.argmax(pad)) if pad.any() else len(text)
        text = torch.from_numpy(text).long()
        text[n_real:] = int(self.config.tokenizer.pad)
        if self.config.add_extra_token_to_sequence:
            tokens, labels = text[:-1].contiguous(), text[1:].contiguous()
        else:
            tokens = text
            labels = torch.roll(text, shifts=-1, dims=0)
            labels[-1] = int(self.config.tokenizer.pad)

        if not self.masks_and_position_ids_are_cacheable or not self.masks_and_position_ids_are_cached:
            attention_mask, loss_mask, position_ids = _get_ltor_masks_and_position_ids(
                tokens,
                self.config.tokenizer.eod,
                self.config.reset_position_ids,
                self.config.reset_attention_mask,
                self.config.eod_mask_loss,
                self.config.create_attention_mask,
            )
            if self.masks_and_position_ids_are_cacheable:
                self.cached_attention_mask = attention_mask
                self.cached_loss_mask = loss_mask
                self.cached_position_ids = position_ids
                self.masks_and_position_ids_are_cached = True
        else:
            attention_mask = self.cached_attention_mask
            position_ids = self.cached_position_ids
        if self.masks_and_position_ids_are_cacheable:
            loss_mask = self.cached_loss_mask.clone()
        # Label i is text[i + 1]: it is real iff i + 1 < n_real (this also covers the wrapped
        # last label when add_extra_token_to_sequence is False).
        loss_mask[max(n_real - 1, 0):] = 0.0
        if idx is None:  # megatron's batch-padding sample: nothing to learn
            loss_mask = torch.zeros_like(loss_mask)
        out = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
        if self.config.create_attention_mask:
            out["attention_mask"] = attention_mask
        return out


class LingMockGPTDataset(LingGPTDataset, MockGPTDataset):
    """megatron's MockGPTDataset (synthetic documents) with LingGPTDataset's padding rule."""


# --------------------------------------------------------------------------------------------
# Quick-start data
# --------------------------------------------------------------------------------------------
_QUICKSTART_VERSION = 2


def _read_manifest(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def prepare_quickstart_data(work_dir: str, tokenizer: str | None = None,
                            max_bytes: int | None = None, progress: bool = True) -> DataConfig:
    """Build (once) the built-in corpus, tokenizer and indexed dataset under ``work_dir``.

    Layout: corpus.jsonl (Python stdlib text, see corpus.py), tokenizer/ (the built-in BPE, when
    ``tokenizer`` is None), text_<tokenizer-sha12>_document.{bin,idx}, index-cache/ and a
    manifest.json written last. Idempotent and atomic (every file is renamed into place when
    complete; a file lock serialises concurrent callers), and a second call only reads the
    manifest. Needs no process group: call it once before a multi-rank launch, or let every rank
    call it (the lock makes the others wait and reuse).

    Returns the DataConfig pointing at the result (paths, tokenizer, cache_dir=work_dir).
    """
    from megatron_ling.data.corpus import DEFAULT_MAX_BYTES, write_corpus
    from megatron_ling.data.locking import file_lock
    from megatron_ling.data.preprocess import preprocess
    from megatron_ling.data.tokenizer import build_builtin_tokenizer, load_tokenizer

    max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else int(max_bytes)
    work_dir = os.path.abspath(work_dir)
    os.makedirs(work_dir, exist_ok=True)
    tok_dir = os.path.abspath(tokenizer) if tokenizer else os.path.join(work_dir, "tokenizer")
    manifest_path = os.path.join(work_dir, "manifest.json")
    import sys

    import tokenizers

    corpus_key = {"version": _QUICKSTART_VERSION, "max_bytes": max_bytes,
                  "python": "%d.%d" % sys.version_info[:2], "tokenizers": tokenizers.__version__}

    def config_for(prefix: str) -> DataConfig:
        return DataConfig(paths=[prefix], tokenizer=tok_dir, cache_dir=work_dir)

    def fast_path() -> DataConfig | None:
        m = _read_manifest(manifest_path)
        if not m or m.get("corpus_key") != corpus_key:
            return None
        entry = m.get("datasets", {}).get(tok_dir)
        if not entry:
            return None
        prefix = entry["prefix"]
        if not all(os.path.isfile(prefix + e) for e in (".bin", ".idx")):
            return None
        if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")) and tokenizer is None:
            return None
        return config_for(prefix)

    cfg = fast_path()
    if cfg is not None:
        return cfg
    with file_lock(os.path.join(work_dir, ".lock")):
        cfg = fast_path()  # another process may have finished while we waited
        if cfg is not None:
            return cfg
        m = _read_manifest(manifest_path) or {}
        corpus_path = os.path.join(work_dir, "corpus.jsonl")
        if m.get("corpus_key") != corpus_key or not os.path.isfile(corpus_path):
            info = write_corpus(corpus_path, max_bytes)
            m = {"corpus_key": corpus_key, "corpus": dataclasses.asdict(info), "datasets": {}}
            if tokenizer is None and os.path.isdir(tok_dir):
                import shutil

                shutil.rmtree(tok_dir)  # trained on an older corpus
        if tokenizer is None and not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
            build_builtin_tokenizer(tok_dir, max_bytes)
        tok = load_tokenizer(tok_dir)
        prefix = os.path.join(work_dir, f"text_{tok.unique_identifiers['sha256'][:12]}_document")
        preprocess([corpus_path], prefix, tok_dir, json_key="text", append_eod=True, workers=1,
                   force=True, progress=progress)
        m.setdefault("datasets", {})[tok_dir] = {"prefix": prefix, "tokenizer": tok.unique_identifiers}
        _write_json_atomic(manifest_path, m)
        return config_for(prefix)


def resolve_data_config(cfg: DataConfig) -> DataConfig:
    """Validate ``cfg``; when it names no data (paths None, not mock), build the quick-start data
    under ``<cache_dir>/quickstart`` and return a copy pointing at it. No process group needed."""
    cfg.validate()
    if cfg.mock or cfg.paths is not None:
        return cfg
    from megatron_ling.data.tokenizer import builtin_tokenizer_dir, default_cache_dir

    root = cfg.cache_dir or default_cache_dir()
    # The built-in tokenizer is shared with load_tokenizer(None, cache_dir): trained once per cache.
    tok = builtin_tokenizer_dir(root) if cfg.tokenizer in (None, "builtin") else cfg.tokenizer
    qs = prepare_quickstart_data(os.path.join(root, "quickstart"), tokenizer=tok)
    return dataclasses.replace(cfg, paths=qs.paths, tokenizer=qs.tokenizer, cache_dir=root)


# --------------------------------------------------------------------------------------------
# Dataset building
# --------------------------------------------------------------------------------------------
def _check_sizes(seq_length: Any, num_samples: Any) -> list[int | None]:
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 1:
        raise LingConfigError(f"seq_length: expected an integer >= 1, got {seq_length!r}")
    if not isinstance(num_samples, (list, tuple)) or len(num_samples) != 3:
        raise LingConfigError(f"num_samples: expected (train, valid, test) sample counts, got {num_samples!r}")
    for n in num_samples:
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise LingConfigError(f"num_samples: expected integers >= 0 (or None for one epoch), got {num_samples!r}")
    return list(num_samples)


def _index_cache_dir(cfg: DataConfig, root: str) -> str:
    """Index-cache folder keyed on the datasets' identity (size and mtime of every .bin/.idx).

    megatron-core names cached sample/shuffle indices by a hash of the dataset *path* and sizes
    (megatron/core/datasets/megatron_dataset.py build_low_level_dataset/description): a dataset
    rewritten in place (e.g. the quick-start corpus after an upgrade) would reuse indices of the old
    one and yield samples of the wrong length. stat() values agree across nodes of a shared FS."""
    import hashlib

    h = hashlib.sha256()
    for prefix in sorted(set(cfg.blend()[0] if cfg.blend() else [])):
        for ext in (".bin", ".idx"):
            st = os.stat(prefix + ext)
            h.update(f"{os.path.abspath(prefix)}{ext}:{st.st_size}:{st.st_mtime_ns};".encode())
    return os.path.join(root, "index-cache", h.hexdigest()[:16])


def gpt_dataset_config(cfg: DataConfig, tokenizer: Any, seq_length: int, **overrides: Any):
    """The megatron.core GPTDatasetConfig for ``cfg`` (exposed for tests and custom builders)."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    from megatron_ling.data.tokenizer import default_cache_dir

    kwargs = dict(
        random_seed=cfg.seed,
        sequence_length=seq_length,
        blend=None if cfg.mock else cfg.blend(),
        split=cfg.split,
        # Index caches: built by rank 0, loaded by the others (so: a shared filesystem). Mock data
        # is generated in memory; its indices (hundreds of MB) are not worth caching.
        path_to_cache=None if cfg.mock else _index_cache_dir(cfg, cfg.cache_dir or default_cache_dir()),
        tokenizer=tokenizer,
        reset_position_ids=cfg.reset_position_ids,
        reset_attention_mask=cfg.reset_attention_mask,
        eod_mask_loss=cfg.eod_mask_loss,
        create_attention_mask=cfg.create_attention_mask,
    )
    kwargs.update(overrides)
    return GPTDatasetConfig(**kwargs)


def build_datasets(cfg: DataConfig, tokenizer: Any, seq_length: int,
                   num_samples: Sequence[int | None]) -> tuple[Any, Any, Any]:
    """(train, valid, test) datasets via megatron.core's BlendedMegatronDatasetBuilder.

    Call on every rank after torch.distributed is initialized (world size 1 is fine):
    megatron-core 0.16.1 builds on rank 0 first, barriers, then loads on the other ranks
    (blended_megatron_dataset_builder.py:523-545), and BlendedDataset calls get_rank()
    whenever an index cache is used (blended_dataset.py:153). A split with weight 0 gives None.
    num_samples: samples to draw per split (None = one epoch); each sample has seq_length tokens.
    """
    sizes = _check_sizes(seq_length, num_samples)
    cfg.validate()
    if not torch.distributed.is_initialized():
        raise RuntimeError(
            "build_datasets must run after torch.distributed.init_process_group (world size 1 is fine): "
            "megatron-core builds the index caches on rank 0 and barriers"
        )
    if not cfg.mock and cfg.paths is None:
        # Rank 0 prepares the quick-start data; the others then take the cached fast path.
        if torch.distributed.get_rank() == 0:
            cfg = resolve_data_config(cfg)
        torch.distributed.barrier()
        if torch.distributed.get_rank() != 0:
            cfg = resolve_data_config(cfg)
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    config = gpt_dataset_config(cfg, tokenizer, seq_length)
    cls = LingMockGPTDataset if cfg.mock else LingGPTDataset
    train, valid, test = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()
    return train, valid, test


# --------------------------------------------------------------------------------------------
# Deterministic, resumable micro-batches
# --------------------------------------------------------------------------------------------
class MicroBatchSampler:
    """Index lists for one data-parallel rank, in Megatron's pretraining order.

    Micro-batch k of rank r holds samples ``c + k*m*D + r*m ... + m - 1`` (c = consumed_samples
    at start, m = micro_batch_size, D = dp_size). So the samples of a global batch are the
    contiguous range that follows ``consumed_samples`` whatever the DP layout, and resuming with
    the consumed count continues exactly where the previous run stopped. The dataset itself is
    already shuffled (megatron's shuffle index, seeded by DataConfig.seed).
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1):
        for name, v, lo in (("micro_batch_size", micro_batch_size, 1), ("dp_size", dp_size, 1),
                            ("consumed_samples", consumed_samples, 0), ("dp_rank", dp_rank, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise LingConfigError(f"{name}: expected an integer >= {lo}, got {v!r}")
        if dp_rank >= dp_size:
            raise LingConfigError(f"dp_rank: {dp_rank} is not < dp_size {dp_size}")
        if consumed_samples > total_samples:
            raise LingConfigError(
                f"consumed_samples: {consumed_samples} exceeds the dataset's {total_samples} samples; "
                "build the datasets with num_samples covering the whole run"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // (self.micro_batch_size * self.dp_size)

    def __iter__(self) -> Iterator[list[int]]:
        stride = self.micro_batch_size * self.dp_size
        start = self.consumed_samples
        lo = self.dp_rank * self.micro_batch_size
        for s in range(start, self.total_samples - stride + 1, stride):
            yield list(range(s + lo, s + lo + self.micro_batch_size))


def _collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in BATCH_KEYS if k in samples[0]}


class BatchIterator:
    """Iterator of micro-batches (dicts of tensors: tokens, labels, loss_mask, position_ids
    [, attention_mask]) that tracks ``consumed_samples`` (global, over all DP ranks)."""

    def __init__(self, dataset, sampler: MicroBatchSampler, num_workers: int = 0):
        self.sampler = sampler
        self.consumed_samples = sampler.consumed_samples
        self._step = sampler.micro_batch_size * sampler.dp_size
        self._loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=_collate,
            persistent_workers=False,
        )
        self._it = iter(self._loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = next(self._it)
        self.consumed_samples += self._step
        return batch

    def __len__(self) -> int:
        return len(self.sampler)


def get_batch_iterator(dataset, micro_batch_size: int, consumed_samples: int = 0, dp_rank: int = 0,
                       dp_size: int = 1, num_workers: int = 0) -> BatchIterator:
    """Deterministic, resumable micro-batches of ``dataset`` for one DP rank (see MicroBatchSampler).

    To resume, pass the global number of samples consumed so far (the trainer saves it in its
    checkpoint: iterations * global_batch_size); the next batches are then identical to those an
    uninterrupted run would have drawn.
    """
    if dataset is None:
        raise LingConfigError("dataset: this split is empty (its weight in data.split is 0)")
    sampler = MicroBatchSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    return BatchIterator(dataset, sampler, num_workers)
