"""DataConfig: the single source of truth for data options in training recipes.

Validation is pure Python (file-system checks only): it needs no process group, so recipes can
be checked before anything is launched.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any

from megatron_ling.config_utils import check_fields, spec
from megatron_ling.errors import LingConfigError

# "98,2,0", "1", "99.5,0.5": one to three non-negative numbers separated by commas.
_SPLIT_RE = re.compile(r"^\s*\d+(\.\d+)?(\s*,\s*\d+(\.\d+)?){0,2}\s*$")

BUILTIN_TOKENIZER = "builtin"


def _is_number(s: Any) -> bool:
    if not isinstance(s, str):
        return isinstance(s, (int, float)) and not isinstance(s, bool)
    try:
        float(s)
        return True
    except ValueError:
        return False


def parse_blend(paths: list[str] | None, field: str = "data.paths") -> tuple[list[str], list[float] | None] | None:
    """Megatron blend list -> (prefixes, weights or None). Raises LingConfigError on bad syntax.

    Accepts ["prefix", ...] (weights inferred from dataset sizes by megatron) or the flattened
    weighted form ["0.7", "prefixA", "0.3", "prefixB"]. Stricter than megatron.core's
    get_blend_from_list, which silently re-reads an odd-length weighted list as prefixes.
    """
    if paths is None:
        return None
    if isinstance(paths, str) or not isinstance(paths, (list, tuple)):
        raise LingConfigError(
            f"{field}: expected a list like [\"/data/prefix\"] or [\"0.7\", \"/data/a\", \"0.3\", \"/data/b\"], "
            f"got {type(paths).__name__} {paths!r}"
        )
    if len(paths) == 0:
        raise LingConfigError(f"{field}: empty list; give at least one dataset prefix or leave it unset (null) "
                              "for the built-in quick-start corpus")
    items = [str(p) if isinstance(p, (int, float)) and not isinstance(p, bool) else p for p in paths]
    for p in items:
        if not isinstance(p, str) or not p.strip():
            raise LingConfigError(f"{field}: every entry must be a non-empty string, got {p!r}")
    numeric = [_is_number(p) for p in items]
    if not any(numeric):
        return list(items), None
    if len(items) % 2 == 1:
        raise LingConfigError(
            f"{field}: weighted blend has an odd number of entries ({len(items)}); write it as "
            f"weight, prefix pairs, e.g. [\"0.7\", \"/data/a\", \"0.3\", \"/data/b\"]"
        )
    weights: list[float] = []
    prefixes: list[str] = []
    for i in range(0, len(items), 2):
        w, p = items[i], items[i + 1]
        if not numeric[i]:
            raise LingConfigError(
                f"{field}: entry {i} ({w!r}) must be a numeric weight in a weighted blend; write it as "
                f"weight, prefix pairs, e.g. [\"0.7\", \"/data/a\", \"0.3\", \"/data/b\"]"
            )
        if numeric[i + 1]:
            raise LingConfigError(
                f"{field}: entry {i + 1} ({p!r}) should be a dataset prefix but is a number; write the "
                f"blend as weight, prefix pairs"
            )
        wf = float(w)
        if not (wf >= 0.0) or wf == float("inf"):
            raise LingConfigError(f"{field}: weight {w!r} for {p!r} must be a finite number >= 0")
        weights.append(wf)
        prefixes.append(p)
    if sum(weights) <= 0:
        raise LingConfigError(f"{field}: all blend weights are 0; give at least one positive weight")
    return prefixes, weights


def parse_split(split: str, field: str = "data.split") -> list[float]:
    """"98,2,0" -> [0.98, 0.02, 0.0]. Raises LingConfigError with the field name on bad input."""
    if not isinstance(split, str) or not _SPLIT_RE.match(split):
        raise LingConfigError(
            f"{field}: {split!r} is not a train,valid,test weighting; use e.g. \"98,2,0\""
        )
    vals = [float(x) for x in split.split(",")]
    vals += [0.0] * (3 - len(vals))
    total = sum(vals)
    if vals[0] <= 0:
        raise LingConfigError(f"{field}: {split!r} gives the train split no data; use e.g. \"98,2,0\"")
    return [v / total for v in vals]


@dataclass
class DataConfig:
    """Data options of a training recipe.

    paths: Megatron blend syntax over ling-preprocess output prefixes (``<prefix>.bin/.idx``):
        ["prefix"], ["prefixA", "prefixB"] (weighted by size) or ["0.7", "prefixA", "0.3", "prefixB"].
        None means the built-in quick-start corpus (see prepare_quickstart_data).
    split: train,valid,test weighting of the documents of every prefix, e.g. "98,2,0".
    tokenizer: HF tokenizer directory; None (or "builtin") = built-in offline byte-level BPE.
    cache_dir: where dataset index caches, the built-in tokenizer and the quick-start corpus live.
        Must be on a filesystem shared by all nodes (rank 0 builds, the others load).
    mock: megatron's MockGPTDataset (synthetic tokens, no files); paths must then be unset.
    eod_mask_loss: megatron's --eod-mask-loss: zero the loss at positions whose input token is EOD.
    num_workers: torch DataLoader workers per rank.
    seed: seed of megatron's document/sample shuffles.
    create_attention_mask: materialise a [1, s, s] causal mask per sample (not needed when the
        attention implementation builds the causal mask itself).
    reset_position_ids / reset_attention_mask: restart positions / attention at every EOD.
    format: "text" (ling-preprocess documents, GPTDataset) or "chat" (ling-preprocess --format chat:
        conversations with an assistant-only loss mask; see megatron_ling.data.packing).
    packing: chat only: several whole conversations per sequence (attention and positions restart
        per conversation); false = one conversation per sequence, padded.
    loss_normalization: chat only: "token" (mean over every assistant token of the global batch,
        as Megatron-Bridge) or "conversation" (mean of per-conversation means).
    """

    paths: list[str] | None = None
    split: str = "98,2,0"
    tokenizer: str | None = None
    cache_dir: str | None = None
    mock: bool = False
    eod_mask_loss: bool = False
    num_workers: int = 0
    seed: int = 1234
    create_attention_mask: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    format: str = spec("text", choices=("text", "chat"))
    packing: bool = True
    loss_normalization: str = spec("token", choices=("token", "conversation"))

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, prefix: str = "data") -> "DataConfig":
        """Build from a recipe mapping; unknown keys are an error naming the key."""
        d = dict(d or {})
        names = [f.name for f in dataclasses.fields(cls)]
        for k in d:
            if k not in names:
                raise LingConfigError(f"{prefix}.{k}: unknown field; valid fields are {', '.join(names)}")
        cfg = cls(**d)
        cfg.validate(prefix)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def blend(self) -> tuple[list[str], list[float] | None] | None:
        """megatron.core BlendedMegatronDatasetConfig.blend for these paths."""
        return parse_blend(self.paths)

    def validate(self, prefix: str = "data") -> "DataConfig":
        """Raise LingConfigError (one line, names the field and the fix) on the first problem."""
        for name in ("mock", "eod_mask_loss", "create_attention_mask", "reset_position_ids",
                     "reset_attention_mask", "packing"):
            if not isinstance(getattr(self, name), bool):
                raise LingConfigError(f"{prefix}.{name}: expected true or false, got {getattr(self, name)!r}")
        for name in ("num_workers", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise LingConfigError(f"{prefix}.{name}: expected an integer >= 0, got {v!r}")
        parse_split(self.split, f"{prefix}.split")
        if self.mock and self.paths is not None:
            raise LingConfigError(f"{prefix}.mock: mock data ignores {prefix}.paths; set one of them, not both")
        blend = parse_blend(self.paths, f"{prefix}.paths")
        if blend is not None:
            for p in blend[0]:
                _check_prefix(p, f"{prefix}.paths")
        if self.tokenizer is not None and self.tokenizer != BUILTIN_TOKENIZER:
            _check_tokenizer_dir(self.tokenizer, f"{prefix}.tokenizer")
        if self.cache_dir is not None:
            if not isinstance(self.cache_dir, str) or not self.cache_dir:
                raise LingConfigError(f"{prefix}.cache_dir: expected a directory path, got {self.cache_dir!r}")
            if os.path.exists(self.cache_dir) and not os.path.isdir(self.cache_dir):
                raise LingConfigError(f"{prefix}.cache_dir: {self.cache_dir!r} exists and is not a directory; "
                                      "point it at a (new or existing) directory")
        check_fields(self, prefix)  # ranges and choices (spec); the exact types were checked above
        self._validate_format(prefix)
        return self

    def _validate_format(self, prefix: str) -> None:
        if self.format == "text":
            name = "packing" if not self.packing else "loss_normalization" if self.loss_normalization != "token" else None
            if name:
                raise LingConfigError(f"{prefix}.{name}: only used with {prefix}.format: chat; remove it")
            return
        if self.mock or self.paths is None:
            raise LingConfigError(f"{prefix}.paths: {prefix}.format: chat needs the prefixes written by "
                                  "`ling-preprocess --format chat` (no mock or quick-start data)")
        if parse_blend(self.paths, f"{prefix}.paths")[1] is not None:
            raise LingConfigError(f"{prefix}.paths: weighted blends are not supported for chat data; list the "
                                  "prefixes (their conversations are pooled)")
        for name in ("eod_mask_loss", "reset_position_ids", "reset_attention_mask", "create_attention_mask"):
            if getattr(self, name):
                raise LingConfigError(f"{prefix}.{name}: not used with {prefix}.format: chat (masks and positions "
                                      "come from the conversations); remove it")


def _check_prefix(p: str, field: str) -> None:
    for ext in (".bin", ".idx"):
        if p.endswith(ext):
            raise LingConfigError(
                f"{field}: {p!r} ends in {ext}; give the prefix without extension ({p[: -len(ext)]!r})"
            )
    missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(p + ext)]
    if missing:
        raise LingConfigError(
            f"{field}: no indexed dataset at prefix {p!r} ({' and '.join(p + m for m in missing)} missing); "
            f"create it with `ling-preprocess --input docs.jsonl --output-prefix {p}` or fix the path"
        )


def _check_tokenizer_dir(path: Any, field: str) -> None:
    if not isinstance(path, str) or not path:
        raise LingConfigError(f"{field}: expected an HF tokenizer directory or null, got {path!r}")
    if not os.path.isdir(path):
        raise LingConfigError(
            f"{field}: {path!r} is not a directory; give a local HF tokenizer directory "
            "(with tokenizer.json) or null for the built-in tokenizer"
        )
    known = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any(os.path.isfile(os.path.join(path, f)) for f in known):
        raise LingConfigError(
            f"{field}: {path!r} holds none of {', '.join(known)}; give a local HF tokenizer directory "
            "or null for the built-in tokenizer"
        )
