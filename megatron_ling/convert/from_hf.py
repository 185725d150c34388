"""HF BailingMoeV2 directory -> megatron-ling torch_dist checkpoint (continued pretraining).

Streaming: one role's HF tensors (or a run of an expert stack's) are read (FP8 ones
dequantized), rearranged to Megatron's layout and appended to its planned torch_dist data file
(files are independent units of ``parallel_exec``: any worker or node writes any of them); the
metadata is written last. The result has the keys, global shapes and chunking megatron-core
writes itself, so ``dist_checkpointing.load`` reshards it to whatever TP/PP/VPP/EP/ETP layout
the trainer runs.

Output layout (the contract with ``ling-train``)::

    OUT_DIR/latest_checkpointed_iteration.txt      "0"
    OUT_DIR/iter_0000000/{.metadata, __0_*.distcp, metadata.json, common.pt}

``common.pt`` = {"ling_config": LingConfig.to_hf_dict(), "iteration": 0, "model_only": True,
"converted_from": HF_DIR}: model weights only (no optimizer, RNG or recipe state).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from megatron_ling.convert import mapping as M
from megatron_ling.checkpoint import layout
from megatron_ling.convert.common import pack_files
from megatron_ling.convert.hf_io import HFReader, fp8_scale_shape, nbytes
from megatron_ling.convert.parallel_exec import (ExecResult, Job, Unit, execute, preflight, resolve_rank,
                                                 summary as _summary)
from megatron_ling.convert.torch_dist import TorchDistWriter, write_metadata
from megatron_ling.errors import LingConfigError
from megatron_ling.models.config import LingConfig

_TORCH = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class FromHFResult:
    out_dir: str
    num_tensors: int
    bytes_written: int
    summary: str
    run: ExecResult  # units run/skipped, whether this rank finalized, peak RSS per worker


def _expected_hf(cfg: LingConfig, mtp: bool) -> dict[str, tuple]:
    return {name: tuple(shape) for unit in M.units(cfg, mtp=mtp) for role in M.layer_roles(cfg, unit)
            for name, shape in M.hf_names(cfg, unit, role)}


def from_hf(hf_dir: str, out_dir: str, dtype: str = "auto", mtp: str = "keep", force: bool = False,
            show_progress: bool = True, file_size: int = 5 * 1024 ** 3, workers: int = 1,
            rank: int | None = None, world_size: int | None = None) -> FromHFResult:
    """Convert; ``workers`` processes write disjoint ``.distcp`` files, ``rank``/``world_size``
    (default: RANK/WORLD_SIZE or a Slurm array) split them between nodes; the last one to finish
    writes ``.metadata``, ``common.pt`` and the tracker, then renames the output into place."""
    if dtype not in ("auto", "bf16", "fp32"):
        raise LingConfigError(f"--dtype: must be auto, bf16 or fp32, got {dtype!r}")
    if mtp not in ("keep", "drop"):
        raise LingConfigError(f"--mtp: must be keep or drop, got {mtp!r}")
    if file_size <= 0:
        raise LingConfigError("--file-size: must be positive")
    rank, world_size = resolve_rank(rank, world_size)
    preflight(out_dir, force, (hf_dir,), world_size)
    cfg = LingConfig.from_hf_config(hf_dir)
    quant = cfg.extra.pop("quantization_config", None)
    if quant is not None and (quant.get("quant_method") != "fp8" or
                              list(quant.get("weight_block_size", [128, 128])) != [128, 128]):
        raise LingConfigError(f"hf: quantization_config {quant} is not supported; only blockwise 128x128 FP8 "
                              f"(quant_method fp8) checkpoints can be imported")
    cfg.extra.pop("torch_dtype", None)
    cfg.validate(prefix="config.json")
    reader = HFReader(hf_dir)

    L = cfg.num_hidden_layers
    has_mtp = any(M.is_mtp_hf_name(cfg, n) for n in reader.meta)
    if cfg.num_nextn_predict_layers and not has_mtp and mtp == "keep":
        raise LingConfigError(f"hf: config.json has num_nextn_predict_layers={cfg.num_nextn_predict_layers} but "
                              f"there are no model.layers.{L}.* tensors; pass --mtp drop to import without MTP")
    keep_mtp = mtp == "keep" and cfg.num_nextn_predict_layers > 0
    if not keep_mtp:
        cfg = cfg.replace(num_nextn_predict_layers=0)

    # validate names and shapes against config.json before writing anything
    expected = _expected_hf(cfg, keep_mtp)
    scales = {n for n in reader.meta if n.endswith("_scale_inv")}
    for n in sorted(reader.meta):
        if n in scales:
            w = n[: -len("_scale_inv")]
            if w not in expected:
                raise LingConfigError(f"hf: unknown tensor {n!r}; it does not belong to a Ling 2.0 model with "
                                      f"this config.json")
            if tuple(reader.meta[n][1]) != fp8_scale_shape(expected[w]):
                raise LingConfigError(f"hf: FP8 scale {n} has shape {reader.meta[n][1]} but 128x128 blocks of "
                                      f"{list(expected[w])} need {list(fp8_scale_shape(expected[w]))}; the FP8 "
                                      f"checkpoint is corrupt")
            continue
        if n not in expected:
            if not keep_mtp and M.is_mtp_hf_name(cfg, n):
                continue  # MTP layer left out on request
            raise LingConfigError(f"hf: unknown tensor {n!r}; it does not belong to a Ling 2.0 model with this "
                                  f"config.json (num_hidden_layers={L}, first_k_dense_replace="
                                  f"{cfg.first_k_dense_replace}, num_experts={cfg.num_experts})")
        if tuple(reader.meta[n][1]) != expected[n]:
            raise LingConfigError(f"hf: tensor {n} has shape {reader.meta[n][1]} but config.json implies "
                                  f"{list(expected[n])}; config.json does not match the weights")
    missing = sorted(set(expected) - set(reader.meta))
    if missing:
        raise LingConfigError(f"hf: tensor {missing[0]} is missing (and {len(missing) - 1} more) although "
                              f"config.json needs it; the download is incomplete or config.json is wrong")

    want = {}
    for unit in M.units(cfg, mtp=keep_mtp):
        for role in M.layer_roles(cfg, unit):
            src = reader.meta[M.hf_names(cfg, unit, role)[0][0]][2]
            want[(unit, role)] = (torch.float32 if role == "expert_bias" else _TORCH.get(dtype) or
                                  (torch.bfloat16 if src == torch.float8_e4m3fn else src))
    job = FromHFJob(hf_dir, cfg, keep_mtp, want, file_size,
                    {n: nbytes(reader.meta[n][1], reader.meta[n][2]) for n in expected})
    reader.close()
    r = execute(job, out_dir, workers, rank, world_size, force, show_progress, "from-hf")
    read = sum(job.units[i].cost for i in r.ran)
    written = sum(rec["bytes"] for rec in r.records) if r.finalized else 0
    return FromHFResult(os.path.abspath(out_dir), len(want), written,
                        _summary(f"from-hf {hf_dir} -> {out_dir}", r, read, written, len(job.units)), r)


class FromHFJob(Job):
    """One unit per planned ``.distcp`` file. The HF tensors are packed into files in conversion
    order (embeddings, layers, MTP, final) up to ``file_size`` bytes each: a role goes whole into
    one file, except the expert stacks, whose HF tensors are each a chunk of their own
    (``mapping.one_chunk_per_hf_tensor``), so a MoE layer is split between files by runs of
    experts. Files therefore keep to ``--file-size`` (a single tensor larger than it gets a file
    alone), and a Ling-1T MoE layer (~25 GB) is not one indivisible unit that caps the scale-out.
    A worker reads a file's HF tensors one piece (a role, or a run of its experts) at a time,
    writes them as Megatron chunks and returns the file's metadata record; ``finalize`` pickles
    ``.metadata`` from all records (joining a tensor's chunks from several files) and writes the
    tracker."""

    def __init__(self, hf_dir: str, cfg: LingConfig, keep_mtp: bool, want: dict, file_size: int,
                 hf_bytes: dict[str, int]):
        self.hf_dir, self.cfg, self.keep_mtp, self.want, self.file_size = hf_dir, cfg, keep_mtp, want, file_size
        self.inputs = (hf_dir,)
        planned = self._pack(cfg, keep_mtp, file_size, hf_bytes)
        self.files = [pieces for pieces, _ in planned]
        self.units = [Unit(f"__0_{k}.distcp", size) for k, (_, size) in enumerate(planned)]
        self._reader = None

    @staticmethod
    def _pack(cfg: LingConfig, keep_mtp: bool, file_size: int,
              hf_bytes: dict[str, int]) -> list[tuple[list[tuple], int]]:
        """Per file (pieces ``(unit, role, lo, hi)``: the role's ``hf_names[lo:hi]``; HF bytes).
        A role's parts are its HF tensors; an expert stack's may be stored apart."""
        items = (((unit, role), [hf_bytes[n] for n, _ in M.hf_names(cfg, unit, role)],
                  M.one_chunk_per_hf_tensor(role))
                 for unit in M.units(cfg, mtp=keep_mtp) for role in M.layer_roles(cfg, unit))
        return [([(*item, lo, hi) for item, lo, hi in pieces], size)
                for pieces, size in pack_files(items, file_size)]

    def __getstate__(self):  # workers open their own reader
        return {**self.__dict__, "_reader": None}

    def describe(self) -> dict:
        return {"job": "from-hf", "hf": os.path.abspath(self.hf_dir), "config": self.cfg.to_hf_dict(),
                "mtp": self.keep_mtp, "dtypes": sorted((str(k), str(v)) for k, v in self.want.items()),
                "files": [[[str(unit), role, lo, hi] for unit, role, lo, hi in f] for f in self.files]}

    def run_unit(self, i: int, out_dir: str, report) -> dict:
        if self._reader is None:
            self._reader = HFReader(self.hf_dir)
        reader, cfg = self._reader, self.cfg
        d = layout.iteration_dir(out_dir, 0)
        writer = TorchDistWriter(d, self.units[i].name)
        for unit, role, lo, hi in self.files[i]:
            out_dtype = self.want[(unit, role)]
            names = [name for name, _ in M.hf_names(cfg, unit, role)]
            whole = (lo, hi) == (0, len(names))
            names = names[lo:hi]
            ts = []
            for name in names:
                t = reader.get_weight(name, out_dtype)
                report(nbytes(reader.meta[name][1], reader.meta[name][2]))
                ts.append(t)
            # stored as the checkpoint keeps them (same dtype, one chunk each): copied in the kernel
            as_stored = M.chunks_are_hf_tensors(role) and all(reader.meta[n][2] == out_dtype for n in names)
            writer.add_chunks(M.megatron_key(unit, role), M.megatron_shape(cfg, role), out_dtype,
                              M.role_chunks_from_hf(cfg, role, ts, start=lo),
                              spans=[reader.span(n) for n in names] if as_stored else None, whole=whole)
            del ts
            if lo == 0:
                for k in M.extra_state_keys(cfg, unit, role):
                    writer.add_object(k, None)
        rec = writer.close()
        rec["files"] = [os.path.relpath(os.path.join(d, rec["rel"]), out_dir)]
        return rec

    def finalize(self, out_dir: str, records: list[dict]) -> None:
        common = {"ling_config": self.cfg.to_hf_dict(), "iteration": 0, "model_only": True,
                  "converted_from": os.path.abspath(self.hf_dir)}
        write_metadata(layout.iteration_dir(out_dir, 0), records, common)
        layout.write_tracker(out_dir, 0)
