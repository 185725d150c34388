"""The bubble profile file format (owner): one JSON per rank, ``<dir>/rank<NNNNN>.json``, written
by the recorder after each recorded step (:func:`write_rank_profile`) and merged into one
:class:`Timeline` per recorded iteration by :func:`load_run`.

A file holds ``format`` (:data:`FORMAT`), the rank's coordinates (``rank``, ``pp_rank``, ``pp``,
``vpp``, ``tp_rank``, ``dp_rank``), ``host``, ``clock`` (``perf_counter`` or ``cuda_events``),
``meta`` (what the run was: see :func:`profile_meta`) and ``steps``: per recorded iteration its
``iteration``, ``t0_abs`` and ``events`` as ``[kind, chunk, mb, start, end(, flags)]`` rows.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from megatron_ling.errors import LingConfigError
from megatron_ling.pipeline.timeline import Event, Timeline

FORMAT = "megatron-ling-bubbles/1"


def profile_meta(ling: dict, layout: Optional[str], pp: int, vpp: Optional[int], seq_length: int,
                 micro_batch_size: int, num_microbatches: int, **extra) -> dict:
    """The ``meta`` of a profile: the model (LingConfig as HF dict), the pipeline layout and the
    batch shape, which ``ling-bubbles report --calibration`` needs to predict from unit costs."""
    return {"ling": ling, "layout": layout, "pp": pp, "vpp": vpp, "seq_length": seq_length,
            "micro_batch_size": micro_batch_size, "num_microbatches": num_microbatches, **extra}


def write_rank_profile(out_dir: str, coords: dict, meta: dict, steps: list) -> str:
    """(Re)write one rank's profile atomically (temporary file, then rename); returns its path.
    ``coords``: rank, pp_rank, pp, vpp, tp_rank, dp_rank, host, clock."""
    doc = {"format": FORMAT, **coords, "meta": meta, "steps": steps}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"rank{coords['rank']:05d}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)
    return path


@dataclass
class Run:
    run_dir: str
    pp: int
    vpp: int
    meta: dict
    timelines: list = field(default_factory=list)  # one per recorded iteration
    clock: str = "perf_counter"
    alignment: str = "barrier"


def _find_dir(run_dir: str) -> str:
    if not os.path.isdir(run_dir):
        raise LingConfigError(f"RUN_DIR: {run_dir} does not exist; pass a training run directory "
                              f"(with bubbles/) or its bubbles/ folder")
    sub = os.path.join(run_dir, "bubbles")
    if glob.glob(os.path.join(sub, "rank*.json")):
        return sub
    if glob.glob(os.path.join(run_dir, "rank*.json")):
        return run_dir
    raise LingConfigError(f"RUN_DIR: no bubble profiles (bubbles/rank*.json) in {run_dir}; run ling-train "
                          f"with profiling.enabled=true (and profiling.steps) first")


def load_run(run_dir: str) -> Run:
    """Merge the per-rank JSON files of a run into one timeline per recorded iteration."""
    d = _find_dir(run_dir)
    docs = []
    for p in sorted(glob.glob(os.path.join(d, "rank*.json"))):
        try:
            with open(p) as f:
                doc = json.load(f)
        except json.JSONDecodeError as e:
            raise LingConfigError(f"RUN_DIR: {p} is not valid JSON ({e}); was the run killed while writing?") from None
        if doc.get("format") != FORMAT:
            raise LingConfigError(f"RUN_DIR: {p} is not a megatron-ling bubble profile")
        docs.append(doc)
    # keep one model replica: the pipeline ranks sharing the first file's tp/dp coordinates
    ref = docs[0]
    docs = [x for x in docs if x.get("tp_rank", 0) == ref.get("tp_rank", 0) and x.get("dp_rank", 0) == ref.get("dp_rank", 0)]
    pp, vpp = ref["pp"], ref["vpp"]
    by_pp = {x["pp_rank"]: x for x in docs}
    missing = [r for r in range(pp) if r not in by_pp]
    if missing:
        raise LingConfigError(f"RUN_DIR: profiles of pipeline ranks {missing} are missing in {d}; "
                              f"every pp rank of one replica must write (profiling.all_ranks or the default)")
    same_host = len({x["host"] for x in by_pp.values()}) == 1 and ref.get("clock") == "perf_counter"
    iters = [s["iteration"] for s in by_pp[0]["steps"]]
    timelines = []
    for it in iters:
        ranks = []
        for r in range(pp):
            steps = {s["iteration"]: s for s in by_pp[r]["steps"]}
            if it not in steps:
                raise LingConfigError(f"RUN_DIR: pp rank {r} has no record of iteration {it}")
            s = steps[it]
            off = s["t0_abs"] if same_host else 0.0
            ranks.append(sorted((Event(e[0], e[1], e[2], e[3] + off, e[4] + off, e[5] if len(e) > 5 else "")
                                 for e in s["events"]), key=lambda e: e.start))
        timelines.append(Timeline._finish(pp, vpp, ranks, iteration=it))
    return Run(run_dir=d, pp=pp, vpp=vpp, meta=ref.get("meta", {}), timelines=timelines, clock=ref.get("clock"),
               alignment="shared monotonic clock" if same_host else "barrier at step start")
