"""WSM checkpoint merging: θ̂ = Σ_j c_j θ_{n+j} over torch_dist checkpoints of one run.

Streaming, no process group: every model tensor is read from each checkpoint in turn
(``TorchDistReader`` assembles it from whatever TP/PP/VPP/EP/ETP layout saved it, so the
checkpoints may differ in layout), scaled and summed into one fp32 accumulator, cast back to the
input dtype and written (``TorchDistWriter``) before the next tensor is read. Peak memory per
worker is the accumulator plus one fp32 copy of the tensor being read (plus that tensor's stored
chunk while it is cast): at most 2x the largest tensor in fp32 plus the accumulator.

The output's ``.distcp`` files are independent units of ``convert.parallel_exec`` (``--workers``
processes write disjoint files); ``.metadata``, ``common.pt``, ``checksums.json`` and the tracker
are written last, and the output appears in one rename when complete.

What is merged: every model weight, and the router's expert bias (with the same coefficients by
default; ``expert_bias="last"`` takes the newest checkpoint's). What is not: optimizer state, RNG
state and the LR-scheduler state (see docs/merge.md): the output is a weights-only checkpoint.

Output (the contract with ``ling-train`` and ``ling-convert to-hf``)::

    OUT/latest_checkpointed_iteration.txt     the newest merged iteration
    OUT/iter_NNNNNNN/                          torch_dist, model weights only

``common.pt``: ``ling_config``, ``iteration`` and ``consumed_samples`` of the newest merged
checkpoint, its ``recipe``, ``model_only: True`` and ``merged_from`` (paths, iterations,
coefficients, shape).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_ling.checkpoint import layout
from megatron_ling.convert import mapping as N
from megatron_ling.convert.common import pack_files
from megatron_ling.convert.parallel_exec import (ExecResult, Job, Unit, execute, preflight, resolve_rank,
                                                 summary as _summary)
from megatron_ling.convert.torch_dist import TorchDistReader, TorchDistWriter, write_metadata
from megatron_ling.errors import LingConfigError
from megatron_ling.merge.coefficients import merge_coefficients, update_weights
from megatron_ling.models.config import LingConfig

_EXPERT_ROLES = ("experts_fc1", "experts_fc2")


@dataclass
class Source:
    iteration: int
    path: str  # the iter_* directory


@dataclass
class MergePlan:
    sources: list[Source]
    coefficients: list[float]
    shape: str

    @property
    def iterations(self) -> list[int]:
        return [s.iteration for s in self.sources]

    def table(self) -> str:
        w = [None] + update_weights(self.coefficients)
        lines = [f"{'iteration':>10} {'c_j':>10} {'w_j':>8}  checkpoint"]
        for s, c, wj in zip(self.sources, self.coefficients, w):
            lines.append(f"{s.iteration:>10} {c:>10.6f} {'-' if wj is None else f'{wj:.4f}':>8}  {s.path}")
        lines.append(f"shape {self.shape}: {len(self.sources)} checkpoints, iterations "
                     f"{self.iterations[0]}..{self.iterations[-1]}, sum c = {sum(self.coefficients):.6f}")
        return "\n".join(lines)


def find_checkpoints(inputs: list[str]) -> dict[int, str]:
    """iteration -> iter_* directory, from run / checkpoint directories (every complete iter_*
    inside) and/or single iter_* directories (the checkpoint layout: ``checkpoint.layout``)."""
    found: dict[int, str] = {}
    for p in inputs:
        if not os.path.isdir(p):
            raise LingConfigError(f"checkpoints: {p} is not a directory; pass a checkpoint directory "
                                  f"(with iter_* inside) or iter_* directories")
        if layout.is_checkpoint(p):
            name = os.path.basename(os.path.normpath(p))
            it = layout.parse_iteration(name[len("iter_"):]) if name.startswith("iter_") else None
            if not isinstance(it, int):
                it = layout.read_common_state(p).get("iteration")
            if not isinstance(it, int):
                raise LingConfigError(f"checkpoints: {p} names no iteration (not an iter_* directory and "
                                      f"no 'iteration' in its common state)")
            items = [(it, p)]
        else:
            root = p if layout.list_iterations(p) else os.path.join(p, layout.RUN_SUBDIR)
            items = [(it, layout.iteration_dir(root, it)) for it in layout.list_iterations(root)]
            if not items:
                raise LingConfigError(f"checkpoints: {p} holds no complete iter_* checkpoint")
        for it, d in items:
            if it in found and os.path.realpath(found[it]) != os.path.realpath(d):
                raise LingConfigError(f"checkpoints: iteration {it} is given twice ({found[it]} and {d}); "
                                      f"pass each iteration once")
            found[it] = d
    return found


def select(found: dict[int, str], last: Optional[int], iterations: Optional[list[int]]) -> list[Source]:
    """The merge window: the newest ``last`` checkpoints (evenly spaced, none missing) or exactly
    ``iterations``."""
    if (last is None) == (iterations is None):
        raise LingConfigError("--last/--iterations: give exactly one: the window size (--last K) or the "
                              "iterations to merge (--iterations I1 I2 ...)")
    have = sorted(found)
    if iterations is not None:
        want = sorted(set(iterations))
        missing = [i for i in want if i not in found]
        if missing:
            raise LingConfigError(f"--iterations: iteration {missing[0]} is missing (checkpoints found: "
                                  f"{', '.join(map(str, have))}); merge only saved iterations")
        return [Source(i, found[i]) for i in want]
    if last < 1:
        raise LingConfigError(f"--last: must be >= 1, got {last}")
    if len(have) < last:
        raise LingConfigError(f"--last: the window of {last} checkpoints is longer than the {len(have)} saved "
                              f"({', '.join(map(str, have))}); save more checkpoints or pass --last {len(have)}")
    win = have[-last:]
    gaps = [b - a for a, b in zip(win, win[1:])]
    if gaps and max(gaps) != min(gaps):
        g = min(gaps)
        j = next(i for i, x in enumerate(gaps) if x != g)
        raise LingConfigError(f"--last: iteration {win[j] + g} is missing from the window {win[0]}..{win[-1]} "
                              f"(checkpoints every {g}); restore it, or pass --iterations to merge an uneven set")
    return [Source(i, found[i]) for i in win]


def _model_keys(reader: TorchDistReader) -> dict[str, tuple]:
    """torch_dist key -> global shape, for model weights only (optimizer / RNG state skipped)."""
    return {k: reader.shape(k) for k in sorted(reader.tensors) if N.classify(k) is not None}


def _config(reader: TorchDistReader) -> LingConfig:
    d = reader.common_state().get("ling_config")
    if not isinstance(d, dict):
        raise LingConfigError(f"checkpoints: {reader.path}/common.pt has no 'ling_config' (not written by "
                              f"megatron-ling?)")
    return LingConfig.from_hf_dict(d)


def check_same_model(readers: list[TorchDistReader]) -> dict[str, tuple]:
    """One-line refusal unless every checkpoint holds the same model (config, keys, shapes)."""
    ref, ref_cfg, ref_keys = readers[-1], _config(readers[-1]), _model_keys(readers[-1])
    for r in readers[:-1]:
        cfg = _config(r)
        diff = [f.name for f in dataclasses.fields(cfg) if f.name != "extra"
                and getattr(cfg, f.name) != getattr(ref_cfg, f.name)]
        if diff:
            k = diff[0]
            raise LingConfigError(f"checkpoints: {r.path} and {ref.path} are different models ({k} "
                                  f"{getattr(cfg, k)!r} vs {getattr(ref_cfg, k)!r}); merge checkpoints of one run")
        keys = _model_keys(r)
        if keys != ref_keys:
            odd = sorted(set(keys) ^ set(ref_keys)) or [k for k in keys if keys[k] != ref_keys[k]]
            raise LingConfigError(f"checkpoints: {r.path} and {ref.path} are different models (tensor {odd[0]!r} "
                                  f"differs); merge checkpoints of one run")
    return ref_keys


class MergedCheckpoint:
    """A virtual checkpoint with TorchDistReader's read interface whose tensors are the merge:
    ``ling-convert``'s to-hf streams it like a checkpoint on disk (``ling-merge --hf``)."""

    def __init__(self, plan: MergePlan, expert_bias: str = "merge", verify_checksums: bool = True):
        if expert_bias not in ("merge", "last"):
            raise LingConfigError(f"--expert-bias: must be merge or last, got {expert_bias!r}")
        self.plan, self.expert_bias = plan, expert_bias
        self.readers = [TorchDistReader(s.path, verify_checksums=verify_checksums) for s in plan.sources]
        self.inputs = tuple(s.path for s in plan.sources)  # an output holding one of them is refused
        self.keys = check_same_model(self.readers)
        last = self.readers[-1]
        self.tensors = {k: last.tensors[k] for k in self.keys}
        self.path = f"merge of {len(self.readers)} checkpoints ({plan.iterations[0]}..{plan.iterations[-1]})"
        self.bytes_read = 0
        self._cached = (None, None)  # (key, merged tensor) of the last read_view

    def __getstate__(self):
        """Sent to a conversion worker (``ling-merge --hf --workers N``) as its plan only: the
        worker reopens the checkpoints itself, without checking their checksums again (this
        process checked them when it opened them)."""
        return {"plan": self.plan, "expert_bias": self.expert_bias}

    def __setstate__(self, state):
        self.__init__(state["plan"], state["expert_bias"], verify_checksums=False)

    def describe(self) -> dict:
        """Everything the merged tensors depend on (JSON-able): part of a conversion plan's
        fingerprint, so that a multi-rank staging dir of another merge is refused."""
        return {"sources": [os.path.abspath(s.path) for s in self.plan.sources],
                "coefficients": self.plan.coefficients, "expert_bias": self.expert_bias}

    def shape(self, key: str) -> tuple:
        return self.readers[-1].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.readers[-1].dtype(key)

    def common_state(self) -> dict:
        return self.readers[-1].common_state()

    def read(self, key: str, offsets: Optional[tuple] = None, sizes: Optional[tuple] = None,
             dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Σ_j c_j θ_j[key] (or of the box ``offsets``/``sizes`` of it: TorchDistReader.read's
        interface), accumulated in fp32, returned in the input dtype (or ``dtype``)."""
        pairs = list(zip(self.plan.coefficients, self.readers))
        if self.expert_bias == "last" and key.endswith("expert_bias"):
            pairs = [(1.0, self.readers[-1])]
        acc = None
        for c, r in pairs:
            if c == 0.0:
                continue  # an explicit zero weight: nothing to read
            x = r.read(key, offsets, sizes, dtype=torch.float32)
            self.bytes_read += x.numel() * r.dtype(key).itemsize
            # products rounded in fp32, then summed in order: exactly Σ c_j θ_j computed in fp32
            x.mul_(c)  # x is a fresh tensor (read() never returns a cached one)
            acc = x if acc is None else acc.add_(x)
            del x
        return acc.to(dtype or self.dtype(key))

    def read_view(self, key: str, offsets: tuple, sizes: tuple) -> torch.Tensor:
        """The box ``offsets``/``sizes`` of the merged ``key`` (to-hf's per-tensor reads): a view of
        the merged tensor, which is kept for the next box of the same key."""
        if self._cached[0] != key:
            self._cached = (None, None)  # drop the old tensor before merging the next one
            self._cached = (key, self.read(key))
        t = self._cached[1]
        for dim, (o, z) in enumerate(zip(offsets, sizes)):
            t = t.narrow(dim, o, z)
        return t

    def common(self) -> dict:
        """common.pt of the merged checkpoint (plain types only)."""
        src = self.common_state()
        out = {"ling_config": src["ling_config"], "iteration": int(src.get("iteration", self.plan.iterations[-1])),
               "consumed_samples": int(src.get("consumed_samples", 0)), "model_only": True,
               "merged_from": {"paths": [os.path.abspath(s.path) for s in self.plan.sources],
                               "iterations": self.plan.iterations, "coefficients": self.plan.coefficients,
                               "shape": self.plan.shape, "expert_bias": self.expert_bias}}
        for k in ("recipe", "megatron_ling_version", "checkpoint_format"):
            if k in src:
                out[k] = src[k]
        return out


@dataclass
class MergeResult:
    out_dir: str
    plan: MergePlan
    num_tensors: int
    summary: str
    run: ExecResult | None = None  # units run, peak RSS per worker (torch_dist output)


def plan_merge(inputs: list[str], last: Optional[int] = None, iterations: Optional[list[int]] = None,
               shape: str = "1-sqrt", ema_decay: float = 0.9, exp_rate: float = 5.0,
               weights: Optional[list[float]] = None) -> MergePlan:
    sources = select(find_checkpoints(inputs), last, iterations)
    c = merge_coefficients(shape, [s.iteration for s in sources], ema_decay=ema_decay, exp_rate=exp_rate,
                           weights=weights)
    return MergePlan(sources=sources, coefficients=c, shape=shape)


def _chunks(key: str, t: torch.Tensor, first: int = 0):
    """(offsets, tensor) chunks of a merged tensor, or of its experts ``first`` on (``t``): each
    expert its own chunk on the expert axis (as megatron saves at EP=E, so an EP-sharded load
    reads only its experts), else one."""
    if N.classify(key).role in _EXPERT_ROLES:
        return [((first + e,) + (0,) * (t.dim() - 1), t[e:e + 1]) for e in range(t.shape[0])]
    return [((0,) * t.dim(), t)]


class MergeJob(Job):
    """One unit per planned ``.distcp`` file: model keys packed in order up to ``file_size``
    output bytes; a key goes whole into one file, except an expert stack, which is split between
    files by runs of experts (its chunks), so that files keep to ``--file-size`` (a single chunk
    larger than it gets a file alone), a Ling-1T MoE layer is not one indivisible unit, and a
    worker holds one run of experts, not the stack. The newest checkpoint's ShardedObjects
    (``_extra_state``) go verbatim into the last file. A worker opens the sources itself (the
    parent verified their checksums); ``finalize`` writes the metadata and the tracker."""

    def __init__(self, merged: MergedCheckpoint, file_size: int):
        self.plan, self.expert_bias = merged.plan, merged.expert_bias
        self.inputs = merged.inputs
        self.common = merged.common()
        self.iteration = self.common["iteration"]
        self.dtypes = {k: merged.dtype(k) for k in merged.keys}
        out_bytes = {k: torch.Size(s).numel() * self.dtypes[k].itemsize for k, s in merged.keys.items()}
        self.shapes = {k: tuple(s) for k, s in merged.keys.items()}
        # a key's parts are the rows of its first axis; an expert stack's rows (experts) may be
        # stored apart
        rows = {k: s[0] if s else 1 for k, s in self.shapes.items()}
        planned = pack_files(((k, [out_bytes[k] // rows[k]] * rows[k], N.classify(k).role in _EXPERT_ROLES)
                              for k in self.shapes), file_size)
        self.groups = [pieces for pieces, _ in planned]  # files as lists of pieces [key, lo, hi]
        self.reads = sum(c != 0.0 for c in self.plan.coefficients)  # checkpoints read per tensor
        self.units = [Unit(f"__0_{i}.distcp", self.reads * size) for i, (_, size) in enumerate(planned)]
        self.objects = sorted(k for k in merged.readers[-1].objects
                              if not k.startswith(("optimizer.", "rng_state", "rerun_state_machine")))
        self._merged = merged  # pickled to a worker as its plan: the worker opens the sources itself

    def describe(self) -> dict:
        return {"job": "merge", **self._merged.describe(), "files": self.groups, "objects": self.objects}

    def run_unit(self, i: int, out_dir: str, report) -> dict:
        merged, read0 = self._merged, self._merged.bytes_read
        d = layout.iteration_dir(out_dir, self.iteration)
        writer = TorchDistWriter(d, self.units[i].name)
        for key, lo, hi in self.groups[i]:
            shape = self.shapes[key]
            whole = not shape or (lo, hi) == (0, shape[0])  # else rows lo:hi of an expert stack
            t = merged.read(key) if whole else merged.read(key, (lo,) + (0,) * (len(shape) - 1),
                                                           (hi - lo,) + shape[1:])
            writer.add_chunks(key, shape, t.dtype, _chunks(key, t, lo), whole=whole)
            report(self.reads * t.numel() * t.element_size())
            del t
        if i == len(self.units) - 1:
            last = merged.readers[-1]
            for key in self.objects:
                writer.add_bytes(key, last.read_bytes(key))
        rec = writer.close()
        rec["files"] = [os.path.relpath(os.path.join(d, rec["rel"]), out_dir)]
        rec["read"] = merged.bytes_read - read0
        return rec

    def finalize(self, out_dir: str, records: list[dict]) -> None:
        write_metadata(layout.iteration_dir(out_dir, self.iteration), records, self.common)
        layout.write_tracker(out_dir, self.iteration)


def merge(plan: MergePlan, out_dir: str, expert_bias: str = "merge", hf: bool = False, hf_dtype: str = "bf16",
          force: bool = False, show_progress: bool = True, workers: int = 1, file_size: int = 5 * 1024 ** 3,
          verify_checksums: bool = True, rank: Optional[int] = None,
          world_size: Optional[int] = None) -> MergeResult:
    """Write the merge of ``plan`` to ``out_dir`` (torch_dist, or HF with ``hf``), atomically:
    ``workers`` processes write disjoint files; ``rank``/``world_size`` (default: RANK/WORLD_SIZE
    or a Slurm array) split the files between nodes sharing the output filesystem, the last one
    to finish writing the metadata (``convert.parallel_exec``)."""
    rank, world_size = resolve_rank(rank, world_size)
    preflight(out_dir, force, tuple(s.path for s in plan.sources), world_size)
    if file_size <= 0:
        raise LingConfigError("--file-size: must be positive")
    merged = MergedCheckpoint(plan, expert_bias, verify_checksums)
    if hf:
        from megatron_ling.convert.to_hf import to_hf

        r = to_hf(merged, out_dir, dtype=hf_dtype, shard_size=file_size, force=force, show_progress=show_progress,
                  workers=workers, rank=rank, world_size=world_size)
        return MergeResult(r.out_dir, plan, r.num_tensors, r.summary.replace("to-hf", "merge", 1), r.run)
    job = MergeJob(merged, file_size)
    r = execute(job, out_dir, workers, rank, world_size, force, show_progress, "merge")
    read = sum(rec["read"] for rec in r.records)
    written = sum(rec["bytes"] for rec in r.records)
    return MergeResult(os.path.abspath(out_dir), plan, len(merged.keys),
                       _summary(f"{merged.path} -> {out_dir}", r, read, written, len(job.units)), r)
