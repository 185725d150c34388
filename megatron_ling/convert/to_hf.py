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
from megatron_ling.convert.common import DTYPES, Throughput, atomic_dir, check_output, progress
from megatron_ling.convert.hf_io import (
    FP8_QUANT_CONFIG,
    ShardedSafetensorsWriter,
    fp8_eligible,
    fp8_quantize,
    fp8_scale_shape,
)
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


def to_hf(ckpt_dir: str, out_dir: str, dtype: str = "bf16", mtp: str = "keep", shard_size: int = 5 * 1024 ** 3,
          hf_files: str | None = None, config: str | None = None, force: bool = False,
          show_progress: bool = True, verify_checksums: bool = True) -> ToHFResult:
    """Convert; returns what was written. Raises LingConfigError (one line) on bad input, before
    anything is written (the output appears only when complete). ``ckpt_dir`` may also be an
    object with TorchDistReader's read interface (``ling-merge --hf`` streams a merge through it)."""
    if dtype not in ("bf16", "fp32", "fp8"):
        raise LingConfigError(f"--dtype: must be bf16, fp32 or fp8, got {dtype!r}")
    if mtp not in ("keep", "drop"):
        raise LingConfigError(f"--mtp: must be keep or drop, got {mtp!r}")
    if shard_size <= 0:
        raise LingConfigError("--shard-size: must be positive")
    check_output(out_dir, force, inputs=(ckpt_dir,) if isinstance(ckpt_dir, str) else ())
    if hf_files is not None and not os.path.isdir(hf_files):
        raise LingConfigError(f"--hf-files: {hf_files} is not a directory")
    reader = (TorchDistReader(ckpt_dir, verify_checksums=verify_checksums) if isinstance(ckpt_dir, str)
              else ckpt_dir)
    cfg = load_config(reader, config)
    keys = index_checkpoint(reader, cfg)
    keep_mtp = mtp == "keep" and cfg.num_nextn_predict_layers > 0
    out_cfg = cfg if keep_mtp else cfg.replace(num_nextn_predict_layers=0)

    # plan every output tensor (names, shapes, dtypes) before reading any weight
    wdtype = torch.bfloat16 if dtype == "fp8" else _TORCH[dtype]
    plan, work = [], []
    for unit in M.units(cfg, mtp=keep_mtp):
        roles = M.layer_roles(cfg, unit)
        items = []
        for role in roles:
            for name, shape in M.hf_names(cfg, unit, role):
                if role == "expert_bias":
                    plan.append((name, shape, torch.float32))  # FACTS §2: always fp32
                elif dtype == "fp8" and fp8_eligible(name, shape):
                    plan.append((name, shape, torch.float8_e4m3fn))
                    plan.append((name + "_scale_inv", fp8_scale_shape(shape), torch.float32))
                else:
                    plan.append((name, shape, wdtype))
            items.append(role)
        work.append((unit, items))

    tp = Throughput()
    with atomic_dir(out_dir, force) as tmp:
        writer = ShardedSafetensorsWriter(tmp, plan, shard_size)
        planned = {n: d for n, _, d in plan}
        bar = progress(writer.total_bytes, "to-hf", show_progress)
        for unit, roles in work:
            for role in roles:
                key = keys[(unit, role)]
                t = reader.read(key)
                tp.read += t.numel() * t.element_size()
                for (name, _), w in zip(M.hf_names(cfg, unit, role), M.role_to_hf(cfg, role, t)):
                    if planned[name] == torch.float8_e4m3fn:
                        q, s = fp8_quantize(w)
                        parts = [(name, q), (name + "_scale_inv", s)]
                    else:
                        parts = [(name, w.to(planned[name]))]
                    for n, x in parts:
                        writer.write(n, x)
                        b = x.numel() * x.element_size()
                        tp.written += b
                        bar.update(b)
                del t
        writer.close()
        bar.close()
        hf_cfg = out_cfg.to_hf_dict()
        hf_cfg["torch_dtype"] = DTYPES[dtype]
        hf_cfg.pop("quantization_config", None)
        if dtype == "fp8":
            hf_cfg["quantization_config"] = dict(FP8_QUANT_CONFIG)
        if hf_files:
            copy_hf_files(hf_files, tmp)
            src_cfg = os.path.join(hf_files, "config.json")
            if os.path.exists(src_cfg):  # remote-code registration lives in the hub config
                hub = read_json(src_cfg, "--hf-files")
                auto_map = hub.get("auto_map") if isinstance(hub, dict) else None
                if auto_map and "auto_map" not in hf_cfg:
                    hf_cfg["auto_map"] = auto_map
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2, sort_keys=True)
            f.write("\n")
    s = tp.summary(f"to-hf {reader.path} -> {out_dir}")
    return ToHFResult(os.path.abspath(out_dir), len(plan), tp.written, tp.elapsed(), s)
