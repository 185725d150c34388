"""Chat samples for SFT: conversations from ``ling-preprocess --format chat`` packed into sequences.

A sample of length ``s`` holds one or more whole conversations (``packing: true``; greedy next-fit in
a seeded order, reshuffled each epoch) or exactly one (``packing: false``), then padding. A
conversation of n tokens takes n - 1 positions (inputs t[:-1], labels t[1:]). Every sample carries:

* ``tokens``, ``labels``: padded with the tokenizer's pad id;
* ``loss_mask``: 1 where the label is an assistant token (content or end marker), else 0;
* ``loss_weight``: what the loss sums with: ``loss_mask`` (``loss_normalization: token``: every
  assistant token of the global batch weighs the same, Megatron-Bridge's rule) or ``loss_mask / n_c``
  for a conversation with n_c assistant labels (``conversation``: every conversation weighs the same);
  the schedule divides by the sum of the weights over the global batch (see training/sft.py);
* ``position_ids``: restart at 0 for every conversation;
* ``doc_ids``: 0, 1, ... per conversation, the padding tail its own document: attention never
  crosses a change of doc id (explicit mask on CPU, cu_seqlens / THD with Transformer Engine).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy
import torch

from megatron_ling.data.chat import mask_prefix, read_meta
from megatron_ling.errors import LingConfigError

LOSS_NORMALIZATIONS = ("token", "conversation")


def check_chat_data(cfg, tokenizer, seq_length: int) -> list[dict]:
    """Preflight for ``data.format: chat`` (no process group): every prefix is complete chat data made
    with this tokenizer, for conversations that fit ``seq_length``. Returns the metadata."""
    metas = []
    for p in cfg.blend()[0]:
        m = read_meta(p)
        if not all(os.path.isfile(mask_prefix(p) + e) for e in (".bin", ".idx")):
            raise LingConfigError(f"data.paths: {mask_prefix(p)}.bin/.idx missing; re-run ling-preprocess --format chat")
        if m.get("tokenizer", {}).get("sha256") != tokenizer.unique_identifiers["sha256"]:
            raise LingConfigError(f"data.tokenizer: {p!r} was tokenized with a different tokenizer; point "
                                  "data.tokenizer at the directory given to ling-preprocess --tokenizer")
        if m["seq_length"] > seq_length:
            raise LingConfigError(f"training.seq_length: {p!r} holds conversations of up to {m['seq_length']} "
                                  f"positions but training.seq_length is {seq_length}; raise it or re-run "
                                  f"ling-preprocess --seq-length {seq_length}")
        metas.append(m)
    return metas


def pack(lengths: numpy.ndarray, order: numpy.ndarray, seq_length: int, packing: bool) -> list[numpy.ndarray]:
    """Bins of conversation indices (in ``order``) whose lengths sum to <= seq_length (next-fit)."""
    if not packing:
        return [order[i:i + 1] for i in range(len(order))]
    bins, cur, used = [], [], 0
    for i in order:
        n = int(lengths[i])
        if cur and used + n > seq_length:
            bins.append(numpy.asarray(cur))
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        bins.append(numpy.asarray(cur))
    return bins


class ChatDataset(torch.utils.data.Dataset):
    """Packed (or one-per-sequence) chat samples over a subset of the conversations of ``prefixes``."""

    def __init__(self, prefixes: Sequence[str], conv_ids: numpy.ndarray, seq_length: int, pad_id: int,
                 packing: bool = True, loss_normalization: str = "token", num_samples: int | None = None,
                 seed: int = 1234):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        if loss_normalization not in LOSS_NORMALIZATIONS:
            raise LingConfigError(f"data.loss_normalization: must be one of {', '.join(LOSS_NORMALIZATIONS)}, "
                                  f"got {loss_normalization!r}")
        self.tokens = [IndexedDataset(p) for p in prefixes]
        self.masks = [IndexedDataset(mask_prefix(p)) for p in prefixes]
        # global conversation id g -> (dataset, document)
        offsets = numpy.cumsum([0] + [len(d) for d in self.tokens])
        conv_ids = numpy.asarray(conv_ids, dtype=numpy.int64)
        ds = numpy.searchsorted(offsets, conv_ids, side="right") - 1
        self._where = list(zip(ds.tolist(), (conv_ids - offsets[ds]).tolist()))
        lengths = numpy.asarray([self.tokens[d].sequence_lengths[j] - 1 for d, j in self._where])
        if len(lengths) and lengths.max() > seq_length:
            raise LingConfigError(f"training.seq_length: a conversation needs {lengths.max()} positions, more than "
                                  f"{seq_length}; re-run ling-preprocess with --seq-length {seq_length}")
        self.seq_length, self.pad_id = seq_length, int(pad_id)
        self.packing, self.loss_normalization = packing, loss_normalization
        self.bins: list[numpy.ndarray] = []
        epoch = 0
        while len(lengths) and (not self.bins or (num_samples is not None and len(self.bins) < num_samples)):
            order = numpy.random.RandomState(seed + epoch).permutation(len(lengths))
            self.bins += pack(lengths, order, seq_length, packing)
            epoch += 1
        if num_samples is not None:
            self.bins = self.bins[:num_samples]
        self.epochs = epoch
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.bins)

    def padding_fraction(self) -> float:
        """Share of sample positions that are padding (over all samples)."""
        used = sum(int(self.lengths[b].sum()) for b in self.bins)
        return 1.0 - used / max(len(self.bins) * self.seq_length, 1)

    def conversation(self, k: int) -> tuple[numpy.ndarray, numpy.ndarray]:
        """(token ids, mask) of local conversation k."""
        d, j = self._where[k]
        return numpy.asarray(self.tokens[d][j], dtype=numpy.int64), numpy.asarray(self.masks[d][j], dtype=numpy.float32)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = self.seq_length
        tokens = numpy.full(s, self.pad_id, dtype=numpy.int64)
        labels = numpy.full(s, self.pad_id, dtype=numpy.int64)
        mask = numpy.zeros(s, dtype=numpy.float32)
        weight = numpy.zeros(s, dtype=numpy.float32)
        pos = numpy.zeros(s, dtype=numpy.int64)
        doc = numpy.zeros(s, dtype=numpy.int64)
        at = 0
        for n_doc, k in enumerate(self.bins[i]):
            ids, m = self.conversation(int(k))
            n = len(ids) - 1
            tokens[at:at + n], labels[at:at + n], mask[at:at + n] = ids[:-1], ids[1:], m[1:]
            w = m[1:] if self.loss_normalization == "token" else m[1:] / max(float(m[1:].sum()), 1.0)
            weight[at:at + n] = w
            pos[at:at + n] = numpy.arange(n)
            doc[at:at + n] = n_doc
            at += n
        pos[at:] = numpy.arange(s - at)
        doc[at:] = len(self.bins[i])  # the padding tail: a document of its own, never in the loss
        return {k: torch.from_numpy(v) for k, v in (("tokens", tokens), ("labels", labels), ("loss_mask", mask),
                                                     ("loss_weight", weight), ("position_ids", pos), ("doc_ids", doc))}


def split_conversations(n: int, split: str, seed: int) -> list[numpy.ndarray]:
    """Seeded permutation of n conversation ids cut by data.split into (train, valid, test)."""
    from megatron_ling.data.config import parse_split

    w = parse_split(split)
    perm = numpy.random.RandomState(seed).permutation(n)
    cut = numpy.round(numpy.cumsum(w) * n).astype(int)
    return [perm[:cut[0]], perm[cut[0]:cut[1]], perm[cut[1]:]]


def build_chat_datasets(cfg, tokenizer, seq_length: int, num_samples: Sequence[int | None]) -> tuple[Any, Any, Any]:
    """(train, valid, test) ChatDatasets of ``cfg`` (data.format: chat); an empty split gives None.
    Pure numpy on local files: every rank builds the same thing, no process group needed."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefixes = cfg.blend()[0]
    n = sum(len(IndexedDataset(p)) for p in prefixes)
    out = []
    for ids, ns in zip(split_conversations(n, cfg.split, cfg.seed), num_samples):
        out.append(ChatDataset(prefixes, ids, seq_length, tokenizer.pad, cfg.packing, cfg.loss_normalization, ns,
                               cfg.seed) if len(ids) else None)
    return tuple(out)
