"""Pipeline layouts: parse and check megatron-core ``pipeline_model_parallel_layout`` strings.

megatron-core 0.16.1 checks layouts with bare asserts (or not at all: an MTP layer on a non-last
pipeline rank with VPP makes the interleaved schedule hang). We check first and answer with one line.
MTP on its own pipeline rank before the loss ("mtp standalone", e.g. "Ett|ttm|L") is allowed with
vpp=1; it needs the embedding group of ``embedding_pp_ranks`` (``training.setup.init_model_parallel``).

Layout syntax (megatron-core): stages separated by '|', listed in schedule order, stage i living on
pp rank i % pp and virtual stage i // pp; 'E' embedding, 't' decoder layer, 'm' MTP layer,
'L' output layer + loss; 'x*n' and '(..)*n' repeat; ',' is cosmetic. Example: "Et*3|(tt|)*29,m|L".
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from megatron_ling.errors import LingConfigError

_FIELD = "parallel.pipeline_layout"


# More units than any model has layers (Ling-1T: 80): a longer expansion is a typo, and expanding
# it (e.g. 'Et*999999999999') would exhaust memory.
MAX_UNITS = 100_000


def expand(layout: str) -> list[str]:
    """'Et*2|(t|)*2,mL' -> ['Ett', 't', 't', 'mL'] (one string of unit letters per stage)."""
    if not isinstance(layout, str):
        raise LingConfigError(f"{_FIELD}: expected a layout string such as 'Et|tt|tmL', got {layout!r}")
    s = layout.replace(",", "").replace(" ", "")

    def repeat(m):
        n = int(m.group(2))
        if len(m.group(1)) * n > MAX_UNITS:
            raise LingConfigError(f"{_FIELD}: {m.group(0)!r} in {layout!r} expands to more than {MAX_UNITS} units; "
                                  f"give repeat counts that match the model's layers")
        return m.group(1) * n

    prev = None
    while prev != s:  # innermost parentheses first, so nesting works
        prev = s
        s = re.sub(r"\(([^()]*)\)\*(\d+)", repeat, s)
        if len(s) > MAX_UNITS:
            raise LingConfigError(f"{_FIELD}: {layout!r} expands to more than {MAX_UNITS} units; "
                                  f"give repeat counts that match the model's layers")
    s = re.sub(r"([A-Za-z])\*(\d+)", repeat, s)
    if len(s) > MAX_UNITS:
        raise LingConfigError(f"{_FIELD}: {layout!r} expands to more than {MAX_UNITS} units; "
                              f"give repeat counts that match the model's layers")
    if "(" in s or ")" in s or "*" in s:
        raise LingConfigError(f"{_FIELD}: cannot parse {layout!r}: unbalanced '()' or a '*' without a count")
    stages = s.split("|")
    for st in stages:
        bad = set(st) - set("EtmL")
        if bad:
            raise LingConfigError(f"{_FIELD}: unknown unit {sorted(bad)[0]!r} in {layout!r}; "
                                  f"use E (embedding), t (layer), m (MTP), L (loss), '|' between stages")
    return stages


@dataclass(frozen=True)
class Layout:
    """stages[pp_rank][vpp_rank] = units of that virtual stage."""

    text: str
    pp: int
    vpp: int
    stages: tuple

    def layers_per_stage(self) -> list[list[int]]:
        return [[st.count("t") for st in row] for row in self.stages]


def check_layout(layout: str, pp: int, num_layers: int, mtp_layers: int, vpp: int | None = None) -> Layout:
    """Parse and validate; raise LingConfigError naming the problem and the fix."""
    flat = expand(layout)
    if len(flat) % pp:
        raise LingConfigError(f"{_FIELD}: {len(flat)} stages in {layout!r} is not a multiple of pp={pp}; "
                              f"give pp*vpp stages separated by '|'")
    nv = len(flat) // pp
    if vpp is not None and vpp != nv:
        raise LingConfigError(f"{_FIELD}: {layout!r} has {nv} virtual stages per rank but parallel.vpp={vpp}; "
                              f"set vpp: null or {nv}")
    units = "".join(flat)
    if units.count("E") != 1 or not units.startswith("E"):
        raise LingConfigError(f"{_FIELD}: the embedding 'E' must appear exactly once, first, in {layout!r}")
    if units.count("L") != 1 or not units.endswith("L"):
        raise LingConfigError(f"{_FIELD}: the loss 'L' must appear exactly once, last, in {layout!r}")
    nt = units.count("t")
    if nt != num_layers:
        raise LingConfigError(f"{_FIELD}: {layout!r} places {nt} decoder layers but the model has "
                              f"{num_layers}; every layer must be placed exactly once")
    nm = units.count("m")
    if nm != mtp_layers:
        raise LingConfigError(f"{_FIELD}: {layout!r} places {nm} MTP layers but the model has {mtp_layers} "
                              f"(num_nextn_predict_layers); add or remove 'm'")
    if nm:
        if "t" in units[units.index("m"):]:
            raise LingConfigError(f"{_FIELD}: MTP layers must come after every decoder layer in {layout!r}")
        holders = [i for i, st in enumerate(flat) if "m" in st]
        if len(holders) != 1:
            raise LingConfigError(f"{_FIELD}: all MTP layers must be in one stage in {layout!r} (megatron-core "
                                  f"builds the MTP block in one virtual stage)")
        if nv > 1 and holders[0] < (nv - 1) * pp:
            # megatron-core builds the MTP block only in the last virtual stage of a pipeline rank
            # (pipeline_parallel_layer_layout.py:120).
            raise LingConfigError(f"{_FIELD}: with vpp={nv}, MTP must be in the last virtual stage of its pipeline "
                                  f"rank (one of the last {pp} stages of {layout!r}, e.g. '...|m|L' or '...|tmL')")
        if nv > 1 and holders[0] == (nv - 1) * pp:
            # Pipeline rank 0 would hold two copies of the word embedding (stage 0 and the MTP
            # stage); finalize_model_grads sums only model[0]'s over the embedding group
            # (finalize_model_grads.py:233), so the copies silently drift apart.
            raise LingConfigError(f"{_FIELD}: with vpp={nv}, MTP must not be on pipeline rank 0 (stage "
                                  f"{holders[0]} of {layout!r}); put it on a later rank's last virtual stage")
    stages = tuple(tuple(flat[v * pp + r] for v in range(nv)) for r in range(pp))
    return Layout(text=layout, pp=pp, vpp=nv, stages=stages)


def mtp_pp_ranks(layout: str | None, pp: int) -> list[int]:
    """Pipeline ranks (positions in the pp group) whose stages hold MTP layers ('m')."""
    if not layout or layout == "auto" or pp <= 1:
        return []
    flat = expand(layout)
    return sorted({i % pp for i, st in enumerate(flat) if "m" in st})


def embedding_pp_ranks(layout: str | None, pp: int, tied: bool) -> list[int]:
    """Positions in the pp group that must join megatron's embedding group: the first stage (the
    word embedding), the MTP stage (its copy of the word embedding, for the MTP input) and, with
    tied embeddings, the last stage (the output layer is the embedding). megatron-core 0.16.1's
    default (``default_embedding_ranks``: first and last) misses a standalone MTP stage; with
    untied embeddings the last stage must stay out, or its output-layer weight and gradient would
    be summed into the embedding's (finalize_model_grads.py:258, language_module.py:245)."""
    if pp <= 1:
        return [0]
    mtp = mtp_pp_ranks(layout, pp)
    if not mtp:
        return [0, pp - 1]  # megatron's default (no layout, or MTP with the loss)
    return sorted({0, *mtp} | ({pp - 1} if tied else set()))


def uniform_layout(num_layers: int, mtp_layers: int, pp: int, vpp: int = 1) -> str:
    """The layout megatron-core builds by default: layers split evenly, E first, MTP+L last."""
    n = pp * vpp
    if num_layers % n:
        raise LingConfigError(f"{_FIELD}: {num_layers} layers do not split evenly over pp*vpp={n} stages; "
                              f"give a pipeline_layout string or num_layers_in_first/last_pipeline_stage")
    per = num_layers // n
    stages = ["t" * per for _ in range(n)]
    stages[0] = "E" + stages[0]
    stages[-1] = stages[-1] + "m" * mtp_layers + "L"
    return "|".join(stages)
