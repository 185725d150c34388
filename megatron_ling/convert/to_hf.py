"""megatron-ling torch_dist checkpoint (any TP/PP/VPP/EP/ETP layout) -> HF BailingMoeV2 directory.

One process, no process group, no GPU: tensors are read from the torch_dist files through their
metadata (see ``torch_dist.py``), converted one layer at a time and streamed into planned
safetensors shards (see ``hf_io.py``).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
from dataclasses import dataclass

import torch

from megatron_ling.config_utils import read_json
from megatron_ling.convert import mapping as M
from megatron_ling.convert.common import DTYPES, Span
from megatron_ling.convert.hf_io import FP8_QUANT_CONFIG, ShardPlan, fp8_eligible, fp8_quantize, fp8_scale_shape
from megatron_ling.convert.parallel_exec import (ExecResult, Job, Unit, execute, preflight, resolve_rank,
                                                 summary as _summary)
from megatron_ling.convert.torch_dist import TorchDistReader
from megatron_ling.errors import LingConfigError
from megatron_ling.models.config import LingConfig

_TORCH = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Files copied by --hf-files: the hub repo's remote code, tokenizer and generation config.
HF_FILE_PATTERNS = ("*.py", "tokenizer*", "special_tokens_map.json", "vocab*", "merges.txt",
                    "added_tokens.json", "generation_config.json", "chat_template*")


@dataclass
class ToHFResult:
    out_dir: str
    num_tensors: int
    bytes_written: int
    seconds: float
    summary: str
    run: ExecResult  # units run/skipped, whether this rank finalized, peak RSS per worker


def index_checkpoint(reader: TorchDistReader, cfg: LingConfig) -> dict:
    """(unit, role) -> torch_dist key, after checking the keys and shapes against ``cfg``."""
    found: dict = {}
    for key in sorted(reader.tensors):
        slot = M.classify(key)
        if slot is None:
            continue
        k = (slot.unit, slot.role)
        if k in found:
            raise LingConfigError(f"checkpoint: tensors {found[k]!r} and {key!r} are the same weight "
                                  f"under two spellings; the checkpoint is inconsistent")
        found[k] = key
    expected = {(u, r) for u in M.units(cfg) for r in M.layer_roles(cfg, u)}
    extra = sorted(set(found) - expected, key=str)
    if extra:
        u, r = extra[0]
        raise LingConfigError(
            f"checkpoint: tensor {found[extra[0]]!r} does not fit the model config (num_hidden_layers="
            f"{cfg.num_hidden_layers}, first_k_dense_replace={cfg.first_k_dense_replace}, "
            f"num_nextn_predict_layers={cfg.num_nextn_predict_layers}); the ling_config stored with the "
            f"checkpoint does not match its tensors - pass the right one with --config")
    missing = sorted(expected - set(found), key=str)
    if missing:
        u, r = missing[0]
        raise LingConfigError(f"checkpoint: no tensor for {M.megatron_key(u, r)!r} (and {len(missing) - 1} more) "
                              f"although the model config needs it; the config does not match the checkpoint "
                              f"or the checkpoint is incomplete")
    for (u, r), key in found.items():
        want = M.megatron_shape(cfg, r)
        if reader.shape(key) != want:
            raise LingConfigError(f"checkpoint: tensor {key!r} has shape {list(reader.shape(key))} but the "
                                  f"model config implies {list(want)}; the config does not match the tensors")
    return found


def load_config(reader: TorchDistReader, config_path: str | None) -> LingConfig:
    if config_path:
        return LingConfig.from_hf_config(config_path).validate()
    common = reader.common_state()
    d = common.get("ling_config")
    if not isinstance(d, dict):
        raise LingConfigError(f"checkpoint: {reader.path}/common.pt has no 'ling_config' (not written by "
                              f"megatron-ling?); pass the model's config.json with --config")
    return LingConfig.from_hf_dict(d).validate()


def copy_hf_files(src: str, dst: str) -> list[str]:
    if not os.path.isdir(src):
        raise LingConfigError(f"--hf-files: {src} is not a directory; pass the model's hub directory "
                              f"(remote code, tokenizer, generation_config.json)")
    copied = []
    for pat in HF_FILE_PATTERNS:
        for p in sorted(glob.glob(os.path.join(src, pat))):
            if os.path.isfile(p) and os.path.basename(p) not in copied:
                shutil.copy2(p, os.path.join(dst, os.path.basename(p)))
                copied.append(os.path.basename(p))
    return copied


class ToHFJob(Job):
    """One unit per planned safetensors shard. A shard's tensors come from consecutive (unit, role)
    slots. An HF tensor stored as exported (same dtype, one contiguous run of a saved chunk: most
    of a bf16 export) is copied file to file in the kernel, never read into memory; any other is a
    view of the saved chunk that holds it (chunks are loaded once, in order) - only QKV, whose rows
    are regrouped, is read whole. Memory: one saved chunk (at most one Megatron tensor) plus the
    tensor being written.

    ``reader`` is the parent's ``TorchDistReader`` (workers open their own on its path; the parent
    already checked the files against the manifest when ``verify_checksums``) or another object
    with its read interface, ``describe()`` and a pickled form that reopens its own inputs
    (``ling-merge --hf``: a ``MergedCheckpoint``)."""

    def __init__(self, reader, cfg: LingConfig, keys: dict, plan: list, shard_size: int, dtype: str,
                 out_cfg: dict, hf_files: str | None):
        self.ckpt = reader.path if isinstance(reader, TorchDistReader) else None
        self.inputs = (self.ckpt,) if self.ckpt else tuple(getattr(reader, "inputs", ()))
        self.cfg, self.keys, self.plan, self.dtype = cfg, keys, plan, dtype
        self.shard_size, self.out_cfg, self.hf_files = shard_size, out_cfg, hf_files
        self.shards = ShardPlan(plan, shard_size)
        self.units = [Unit(f, self.shards.shard_bytes(i)) for i, f in enumerate(self.shards.files)]
        self.dtypes = {n: d for n, _, d in plan}
        self.dtypes_of_weights = {n for unit, role in keys for n, _ in M.hf_names(cfg, unit, role)}
        self._reader = reader

    def __getstate__(self):  # workers open their own checkpoint reader (a merge pickles as its plan)
        return {**self.__dict__, "_reader": None} if self.ckpt else self.__dict__

    def describe(self) -> dict:
        src = self.ckpt if self.ckpt else self._reader.describe()
        return {"job": "to-hf", "ckpt": src, "plan": [(n, list(s), str(d)) for n, s, d in self.plan],
                "shard_size": self.shard_size, "config": self.out_cfg, "hf_files": self.hf_files}

    def _slots(self, i: int):
        """Shard i as (unit, role, [(j, name)]) groups in write order; j indexes hf_names(unit, role),
        ``name`` is that weight or its FP8 ``_scale_inv``."""
        src = {}
        for unit, role in self.keys:
            for j, (name, _) in enumerate(M.hf_names(self.cfg, unit, role)):
                src[name] = src[name + "_scale_inv"] = (unit, role, j)
        groups = []
        for name, _, _ in self.shards.shards[i]:
            unit, role, j = src[name]
            if not groups or groups[-1][:2] != (unit, role):
                groups.append((unit, role, []))
            groups[-1][2].append((j, name))
        return groups

    def _tensors(self, reader, unit, role, wanted):
        """The planned (name, tensor) pairs ``wanted`` of one slot: each HF tensor a view of the saved
        chunk holding it (``mapping.hf_box``); QKV from one read of the whole tensor."""
        key = self.keys[(unit, role)]
        qkv = M.hf_box(self.cfg, role, 0) is None
        outs = M.role_to_hf(self.cfg, role, reader.read(key)) if qkv else None
        quantized = {}
        for j, name in wanted:
            weight = name[: -len("_scale_inv")] if name not in self.dtypes_of_weights else name
            dt = self.dtypes[weight]
            if qkv:
                w = outs[j]
            else:
                off, size, drop_expert_axis = M.hf_box(self.cfg, role, j)
                span = self._span(reader, key, off, size, dt)
                if span is not None:
                    yield name, span  # the stored bytes are the output bytes: copied in the kernel
                    continue
                w = reader.read_view(key, off, size)
                w = w.squeeze(0) if drop_expert_axis else w
            if dt == torch.float8_e4m3fn:
                if j not in quantized:
                    quantized = {j: fp8_quantize(w)}  # only the current weight's pair is kept
                yield name, quantized[j][0 if name == weight else 1]
            else:
                yield name, w.to(dt)

    @staticmethod
    def _span(reader, key: str, off, size, dtype: torch.dtype) -> Span | None:
        """Where the HF tensor's bytes lie in the checkpoint when it is stored as exported (same
        dtype, one contiguous run of a saved chunk); None for a merge streamed in (no files) or
        when the tensor must be converted."""
        if not isinstance(reader, TorchDistReader) or reader.dtype(key) != dtype:
            return None
        return reader.span(key, off, size)

    def run_unit(self, i: int, out_dir: str, report) -> dict:
        if self._reader is None:  # a worker: the parent verified the checksums before it started
            self._reader = TorchDistReader(self.ckpt, verify_checksums=False)
        f = self.shards.open_shard(out_dir, i)
        for unit, role, wanted in self._slots(i):
            for name, x in self._tensors(self._reader, unit, role, wanted):
                if isinstance(x, Span):
                    f.copy(name, x)
                    report(x.length)
                else:
                    f.write(name, x)
                    report(x.numel() * x.element_size())
        f.close()
        return {"files": [self.shards.files[i]]}

    data_files: list = []  # the checkpoint's .distcp files to check against its manifest

    def verify_inputs(self) -> None:
        if self.data_files:
            from megatron_ling.checkpoint import manifest

            manifest.check(self.ckpt, self.data_files)

    def finalize(self, out_dir: str, records: list[dict]) -> None:
        self.shards.write_index(out_dir)
        if self.hf_files:
            copy_hf_files(self.hf_files, out_dir)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(self.out_cfg, f, indent=2, sort_keys=True)
            f.write("\n")


def hf_config(out_cfg: LingConfig, dtype: str, hf_files: str | None) -> dict:
    """The exported config.json: torch_dtype, FP8 quantization_config, the hub's auto_map."""
    hf_cfg = out_cfg.to_hf_dict()
    hf_cfg["torch_dtype"] = DTYPES[dtype]
    hf_cfg.pop("quantization_config", None)
    if dtype == "fp8":
        hf_cfg["quantization_config"] = dict(FP8_QUANT_CONFIG)
    if hf_files:
        src_cfg = os.path.join(hf_files, "config.json")
        if os.path.exists(src_cfg):  # remote-code registration lives in the hub config
            hub = read_json(src_cfg, "--hf-files")
            auto_map = hub.get("auto_map") if isinstance(hub, dict) else None
            if auto_map and "auto_map" not in hf_cfg:
                hf_cfg["auto_map"] = auto_map
    return hf_cfg


def to_hf(ckpt_dir: str, out_dir: str, dtype: str = "bf16", mtp: str = "keep", shard_size: int = 5 * 1024 ** 3,
          hf_files: str | None = None, config: str | None = None, force: bool = False,
          show_progress: bool = True, workers: int = 1, rank: int | None = None,
          world_size: int | None = None, verify_checksums: bool = True) -> ToHFResult:
    """Convert; returns what was written. Raises LingConfigError (one line) on bad input, before
    anything is written (the output appears only when complete). ``workers`` processes write
    disjoint shards; ``rank``/``world_size`` (default: RANK/WORLD_SIZE or a Slurm array) split the
    shards between nodes sharing the output filesystem; the last one to finish writes the index.
    ``ckpt_dir`` may also be an object with TorchDistReader's read interface (``ling-merge --hf``
    streams a merge through it: see ``ToHFJob``)."""
    if dtype not in ("bf16", "fp32", "fp8"):
        raise LingConfigError(f"--dtype: must be bf16, fp32 or fp8, got {dtype!r}")
    if mtp not in ("keep", "drop"):
        raise LingConfigError(f"--mtp: must be keep or drop, got {mtp!r}")
    if shard_size <= 0:
        raise LingConfigError("--shard-size: must be positive")
    streamed = not isinstance(ckpt_dir, str)
    rank, world_size = resolve_rank(rank, world_size)
    preflight(out_dir, force, tuple(getattr(ckpt_dir, "inputs", ())) if streamed else (ckpt_dir,), world_size)
    if hf_files is not None and not os.path.isdir(hf_files):
        raise LingConfigError(f"--hf-files: {hf_files} is not a directory")
    data_files = []  # checked against the manifest beside the conversion (ToHFJob.verify_inputs)
    if not streamed and verify_checksums:
        from megatron_ling.checkpoint import manifest
        from megatron_ling.checkpoint.layout import resolve

        path = resolve(ckpt_dir)
        small, data_files = manifest.split(path)
        manifest.check(path, small)  # read while planning: checked first
    reader = ckpt_dir if streamed else TorchDistReader(ckpt_dir, verify_checksums=False)
    cfg = load_config(reader, config)
    keys = index_checkpoint(reader, cfg)
    keep_mtp = mtp == "keep" and cfg.num_nextn_predict_layers > 0
    out_cfg = cfg if keep_mtp else cfg.replace(num_nextn_predict_layers=0)

    # plan every output tensor (names, shapes, dtypes) before reading any weight
    wdtype = torch.bfloat16 if dtype == "fp8" else _TORCH[dtype]
    plan = []
    slots = {}
    for unit in M.units(cfg, mtp=keep_mtp):
        for role in M.layer_roles(cfg, unit):
            slots[(unit, role)] = keys[(unit, role)]
            for name, shape in M.hf_names(cfg, unit, role):
                if role == "expert_bias":
                    plan.append((name, shape, torch.float32))  # FACTS §2: always fp32
                elif dtype == "fp8" and fp8_eligible(name, shape):
                    plan.append((name, shape, torch.float8_e4m3fn))
                    plan.append((name + "_scale_inv", fp8_scale_shape(shape), torch.float32))
                else:
                    plan.append((name, shape, wdtype))
    job = ToHFJob(reader, cfg, slots, plan, shard_size, dtype, hf_config(out_cfg, dtype, hf_files), hf_files)
    job.data_files = data_files
    r = execute(job, out_dir, workers, rank, world_size, force, show_progress, "to-hf")
    written = sum(job.units[i].cost for i in r.ran)
    read = sum(reader.tensors[k].size.numel() * reader.dtype(k).itemsize for k in slots.values())
    s = _summary(f"to-hf {reader.path} -> {out_dir}", r, read if r.ran else 0, written, len(job.units))
    return ToHFResult(os.path.abspath(out_dir), len(plan), written, r.seconds, s, r)

