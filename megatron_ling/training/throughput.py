"""TFLOP/s per GPU and MFU for the training log, from the analytic FLOP count.

``TFLOP/s/GPU`` is what Megatron-LM prints as "throughput per GPU": the FLOPs the GPUs execute
per iteration (forward + backward, MTP and activation recompute included) / step time / world
size. ``MFU`` divides the *model* FLOPs (recompute not counted, as in the PaLM definition) per
GPU-second by the device's dense peak at the training precision. The peak comes from the table
below (NVIDIA / AMD datasheets, dense, no sparsity) or ``logging.peak_tflops``; on a device the
table does not know (e.g. the CPU) MFU is left out unless the recipe gives the peak.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_ling.pipeline.costmodel import training_flops_per_token

# device-name substring -> dense peak TFLOP/s per GPU for (tf32, bf16/fp16, fp8); first match wins
PEAK_TFLOPS = (
    ("H100 PCIe", (378.0, 756.0, 1513.0)),
    ("H100", (494.7, 989.4, 1978.9)),
    ("H200", (494.7, 989.4, 1978.9)),
    ("H800", (494.7, 989.4, 1978.9)),
    ("H20", (74.0, 148.0, 296.0)),
    ("GB200", (1250.0, 2500.0, 5000.0)),
    ("B200", (1100.0, 2250.0, 4500.0)),
    ("A100", (156.0, 312.0, None)),
    ("A800", (156.0, 312.0, None)),
    ("L40S", (183.0, 362.0, 733.0)),
    ("MI300X", (653.7, 1307.4, 2614.9)),
)


def device_peak_tflops(precision: str, fp8: Optional[str]) -> Optional[float]:
    """Dense peak of this process's GPU at the training precision, or None when unknown."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    col = 2 if fp8 else (0 if precision == "fp32" else 1)
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks[col]
    return None


class ThroughputMeter:
    """FLOPs of one iteration of a recipe; ``scalars(step_s)`` -> tflops_per_gpu (and mfu)."""

    def __init__(self, ling, recipe, world_size: int):
        t, m = recipe.training, recipe.model
        tokens = t.global_batch_size * t.seq_length
        self.flops = tokens * training_flops_per_token(ling, t.seq_length, m.recompute, m.recompute_modules)
        self.model_flops = tokens * training_flops_per_token(ling, t.seq_length)
        self.world = world_size
        self.peak = recipe.logging.peak_tflops or device_peak_tflops(m.precision, m.fp8)

    def scalars(self, step_s: float) -> dict:
        out = {"tflops_per_gpu": self.flops / step_s / self.world / 1e12}
        if self.peak:
            out["mfu"] = self.model_flops / step_s / self.world / (self.peak * 1e12)
        return out
