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
import re
from dataclasses import dataclass

import torch

from megatron_ling.convert import names as N
from megatron_ling.convert.common import Throughput, atomic_dir, check_output, progress
from megatron_ling.convert.hf_io import HFReader, nbytes
from megatron_ling.convert.torch_dist import TRACKER, TorchDistWriter, iteration_dir
from megatron_ling.errors import LingConfigError
from megatron_ling.models.config import LingConfig

_TORCH = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Keys megatron-core 0.16.1 (local spec) saves as ShardedObjects: each Linear's `_extra_state`
# (None without Transformer Engine FP8), except the output layer's. Written so that a strict
# (raise_all) load finds exactly the keys it asks for; tests compare the key set with a real save.
_EXTRA_STATE_ROLES = {
    "qkv": ("self_attention.linear_qkv",), "proj": ("self_attention.linear_proj",),
    "fc1": ("mlp.linear_fc1",), "fc2": ("mlp.linear_fc2",),
    "shared_fc1": ("mlp.shared_experts.linear_fc1",), "shared_fc2": ("mlp.shared_experts.linear_fc2",),
    "experts_fc1": ("mlp.experts.experts.linear_fc1",), "experts_fc2": ("mlp.experts.experts.linear_fc2",),
}


@dataclass
class FromHFResult:
    out_dir: str
    num_tensors: int
    bytes_written: int
    summary: str


def _expected_hf(cfg: LingConfig, mtp: bool, fp8_names: set[str]) -> dict[str, tuple]:
    exp = {}
    for unit in N.units(cfg, mtp=mtp):
        for role in N.layer_roles(cfg, unit):
            for name, shape in N.hf_names(cfg, unit, role):
                exp[name] = tuple(shape)
    return exp


def _extra_state_keys(cfg: LingConfig, unit, role: str, mtp_inner: str) -> list[str]:
    if role not in _EXTRA_STATE_ROLES or unit in ("embed", "final"):
        return []
    kind, i = unit
    base = f"decoder.layers.{i}." if kind == "layer" else f"mtp.layers.{i}.{mtp_inner}."
    out = []
    for mod in _EXTRA_STATE_ROLES[role]:
        if role.startswith("experts"):
            out += [f"{base}{mod}._extra_state/shard_{e}_{cfg.num_experts}" for e in range(cfg.num_experts)]
        else:
            out.append(f"{base}{mod}._extra_state/shard_0_1")
    return out


def from_hf(hf_dir: str, out_dir: str, dtype: str = "auto", mtp: str = "keep", force: bool = False,
            show_progress: bool = True, file_size: int = 5 * 1024 ** 3) -> FromHFResult:
    if dtype not in ("auto", "bf16", "fp32"):
        raise LingConfigError(f"--dtype: must be auto, bf16 or fp32, got {dtype!r}")
    if mtp not in ("keep", "drop"):
        raise LingConfigError(f"--mtp: must be keep or drop, got {mtp!r}")
    check_output(out_dir, force)
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
    has_mtp = any(re.match(rf"model\.layers\.{L + j}\.", n) for n in reader.meta
                  for j in range(max(cfg.num_nextn_predict_layers, 1)))
    if cfg.num_nextn_predict_layers and not has_mtp and mtp == "keep":
        raise LingConfigError(f"hf: config.json has num_nextn_predict_layers={cfg.num_nextn_predict_layers} but "
                              f"there are no model.layers.{L}.* tensors; pass --mtp drop to import without MTP")
    keep_mtp = mtp == "keep" and cfg.num_nextn_predict_layers > 0
    if not keep_mtp:
        cfg = cfg.replace(num_nextn_predict_layers=0)

    # validate names and shapes against config.json before writing anything
    expected = _expected_hf(cfg, keep_mtp, set())
    scales = {n for n in reader.meta if n.endswith("_scale_inv")}
    for n in sorted(reader.meta):
        if n in scales:
            if n[: -len("_scale_inv")] not in expected:
                raise LingConfigError(f"hf: unknown tensor {n!r}; it does not belong to a Ling 2.0 model with "
                                      f"this config.json")
            continue
        if n not in expected:
            if not keep_mtp and re.match(rf"model\.layers\.(\d+)\.", n) and int(n.split(".")[2]) >= L:
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
    mtp_inner = N.MTP_INNER[0]
    with atomic_dir(out_dir, force) as tmp:
        d = iteration_dir(tmp, 0)
        writer = TorchDistWriter(d, file_size=file_size)
        bar = progress(total, "from-hf", show_progress)
        count = 0
        for unit in N.units(cfg, mtp=keep_mtp):
            for role in N.layer_roles(cfg, unit):
                ts = []
                for name, _ in N.hf_names(cfg, unit, role):
                    src_dtype = reader.meta[name][2]
                    want = (torch.float32 if role == "expert_bias" else
                            _TORCH.get(dtype) or (torch.bfloat16 if src_dtype == torch.float8_e4m3fn else None))
                    t = reader.get_weight(name, want)
                    b = nbytes(reader.meta[name][1], src_dtype)
                    tp.read += b
                    bar.update(b)
                    ts.append(t)
                out_dtype = torch.float32 if role == "expert_bias" else ts[0].dtype
                writer.add_chunks(N.megatron_key(unit, role, mtp_inner), N.megatron_shape(cfg, role), out_dtype,
                                  N.role_chunks_from_hf(cfg, role, ts))
                del ts
                count += 1
                for k in _extra_state_keys(cfg, unit, role, mtp_inner):
                    writer.add_object(k, None)
                if unit not in ("embed", "final") and unit[0] == "mtp" and role == "eh_proj":
                    writer.add_object(f"mtp.layers.{unit[1]}.eh_proj._extra_state/shard_0_1", None)
        bar.close()
        reader.close()
        common = {"ling_config": cfg.to_hf_dict(), "iteration": 0, "model_only": True,
                  "converted_from": os.path.abspath(hf_dir)}
        writer.close(common)
        tp.written = writer.bytes_written
        with open(os.path.join(tmp, TRACKER), "w") as f:
            f.write("0")
    return FromHFResult(os.path.abspath(out_dir), count, tp.written,
                        tp.summary(f"from-hf {hf_dir} -> {out_dir}"))
