"""Training-time model options: how Megatron-Core runs a Ling model (not what the model is)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_ling.config_utils import check_fields, spec
from megatron_ling.errors import LingConfigError


@dataclass
class ModelOptions:
    precision: str = spec("fp32", choices=("fp32", "bf16", "fp16"))
    fp8: Optional[str] = None  # None | "blockwise" (1x128 act, 128x128 weights, e4m3; needs TE) | "delayed" | "tensorwise"
    # Ling's aux-loss-free balancing: b += u * (sign(e) - mean(sign(e))) (zero-mean), FACTS §2
    expert_bias_update_rate: float = spec(1e-3, ">= 0")
    zero_mean_bias_update: bool = True
    z_loss_coeff: float = spec(3.5e-6, ">= 0")
    aux_loss_coeff: float = spec(0.0, ">= 0")
    grouped_gemm: Optional[bool] = None  # None: on when Transformer Engine + CUDA are present
    recompute: Optional[str] = None  # None | "full" | "selective"
    recompute_modules: Optional[list] = None  # for selective, e.g. ["moe", "layernorm"]
    recompute_num_layers: int = spec(1, ">= 1")
    attention_backend: str = "auto"
    init_std: Optional[float] = spec(None, "> 0")  # None: model.initializer_range
    seed: int = spec(1234, ">= 0")

    def validate(self, prefix: str = "model") -> "ModelOptions":
        check_fields(self, prefix)
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise LingConfigError(f"{prefix}.precision: must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.fp8 not in (None, "blockwise", "delayed", "tensorwise", "mxfp8"):
            raise LingConfigError(f"{prefix}.fp8: must be null, blockwise, delayed, tensorwise or mxfp8, got {self.fp8!r}")
        if self.recompute not in (None, "full", "selective"):
            raise LingConfigError(f"{prefix}.recompute: must be null, full or selective, got {self.recompute!r}")
        if self.expert_bias_update_rate < 0:
            raise LingConfigError(f"{prefix}.expert_bias_update_rate: must be >= 0")
        return self
