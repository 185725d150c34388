"""HF BailingMoeV2 directory -> megatron-ling torch_dist checkpoint (continued pretraining).

Streaming: one layer's HF tensors are read (FP8 ones dequantized), rearranged to Megatron's
layout and appended to the torch_dist data file; the metadata is written last. The result has the
keys, global shapes and chunking megatron-core writes itself, so ``dist_checkpointing.load``
reshards it to whatever TP/PP/VPP/EP/ETP layout the trainer runs.

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
from megatron_ling.convert.common import Throughput, atomic_dir, check_output, progress
from megatron_ling.convert.hf_io import HFReader, nbytes
from megatron_ling.checkpoint import layout
from megatron_ling.convert.torch_dist import TorchDistWriter
from megatron_ling.errors import LingConfigError
from megatron_ling.models.config import LingConfig

_TORCH = {"bf16": torch.bfloat16, "fp32": torch.float32}
@dataclass
class FromHFResult:
    out_dir: str
    num_tensors: int
    bytes_written: int
    summary: str


def _expected_hf(cfg: LingConfig, mtp: bool) -> dict[str, tuple]:
    return {name: tuple(shape) for unit in M.units(cfg, mtp=mtp) for role in M.layer_roles(cfg, unit)
            for name, shape in M.hf_names(cfg, unit, role)}


def from_hf(hf_dir: str, out_dir: str, dtype: str = "auto", mtp: str = "keep", force: bool = False,
            show_progress: bool = True, file_size: int = 5 * 1024 ** 3) -> FromHFResult:
    if dtype not in ("auto", "bf16", "fp32"):
        raise LingConfigError(f"--dtype: must be auto, bf16 or fp32, got {dtype!r}")
    if mtp not in ("keep", "drop"):
        raise LingConfigError(f"--mtp: must be keep or drop, got {mtp!r}")
    check_output(out_dir, force, inputs=(hf_dir,))
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
            if n[: -len("_scale_inv")] not in expected:
                raise LingConfigError(f"hf: unknown tensor {n!r}; it does not belong to a Ling 2.0 model with "
                                      f"this config.json")
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

    total = sum(nbytes(reader.meta[n][1], reader.meta[n][2]) for n in expected)
    tp = Throughput()
    with atomic_dir(out_dir, force) as tmp:
        d = layout.iteration_dir(tmp, 0)
        writer = TorchDistWriter(d, file_size=file_size)
        bar = progress(total, "from-hf", show_progress)
        count = 0
        for unit in M.units(cfg, mtp=keep_mtp):
            for role in M.layer_roles(cfg, unit):
                ts = []
                for name, _ in M.hf_names(cfg, unit, role):
                    src_dtype = reader.meta[name][2]
                    want = (torch.float32 if role == "expert_bias" else
                            _TORCH.get(dtype) or (torch.bfloat16 if src_dtype == torch.float8_e4m3fn else None))
                    t = reader.get_weight(name, want)
                    b = nbytes(reader.meta[name][1], src_dtype)
                    tp.read += b
                    bar.update(b)
                    ts.append(t)
                out_dtype = torch.float32 if role == "expert_bias" else ts[0].dtype
                writer.add_chunks(M.megatron_key(unit, role), M.megatron_shape(cfg, role), out_dtype,
                                  M.role_chunks_from_hf(cfg, role, ts))
                del ts
                count += 1
                for k in M.extra_state_keys(cfg, unit, role):
                    writer.add_object(k, None)
        bar.close()
        reader.close()
        common = {"ling_config": cfg.to_hf_dict(), "iteration": 0, "model_only": True,
                  "converted_from": os.path.abspath(hf_dir)}
        writer.close(common)
        tp.written = writer.bytes_written
        layout.write_tracker(tmp, 0)
    return FromHFResult(os.path.abspath(out_dir), count, tp.written,
                        tp.summary(f"from-hf {hf_dir} -> {out_dir}"))
