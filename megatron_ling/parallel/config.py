"""Parallel layout of a training job: the single source of truth for TP/PP/VPP/EP/ETP/CP/DP."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_ling.config_utils import check_fields, spec
from megatron_ling.errors import LingConfigError


@dataclass
class ParallelConfig:
    tp: int = spec(1, ">= 1")  # tensor parallel
    pp: int = spec(1, ">= 1")  # pipeline parallel
    vpp: Optional[int] = spec(None, ">= 1")  # virtual pipeline stages per rank (interleaved 1F1B)
    ep: int = spec(1, ">= 1")  # expert parallel
    etp: Optional[int] = spec(None, ">= 1")  # expert tensor parallel; None = same as tp (see validate)
    cp: int = spec(1, ">= 1")  # context parallel
    sp: Optional[bool] = None  # sequence parallel; None = on whenever tp > 1
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    bucket_size: Optional[int] = spec(None, ">= 1")
    # megatron-core `pipeline_model_parallel_layout` string ("Et|tt|tmL"), or "auto" (planner).
    pipeline_layout: Optional[str] = None
    num_layers_in_first_pipeline_stage: Optional[int] = spec(None, ">= 0")
    num_layers_in_last_pipeline_stage: Optional[int] = spec(None, ">= 0")
    account_for_embedding_in_pipeline_split: bool = False
    account_for_loss_in_pipeline_split: bool = False
    moe_token_dispatcher: str = spec("alltoall", choices=("allgather", "alltoall", "flex"))
    use_tp_pp_dp_mapping: bool = False

    @property
    def sequence_parallel(self) -> bool:
        return self.tp > 1 if self.sp is None else bool(self.sp)

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def virtual_stages(self) -> Optional[int]:
        """Megatron's virtual_pipeline_model_parallel_size: None unless interleaving (vpp > 1)."""
        return self.vpp if (self.vpp or 1) > 1 else None

    def megatron_sizes(self) -> dict:
        """The group sizes under the names both megatron's initialize_model_parallel and its
        TransformerConfig use."""
        return dict(tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
                    virtual_pipeline_model_parallel_size=self.virtual_stages, context_parallel_size=self.cp,
                    expert_model_parallel_size=self.ep, expert_tensor_parallel_size=self.expert_tp)

    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size()

    def validate(self, world_size: Optional[int] = None, prefix: str = "parallel") -> "ParallelConfig":
        def bad(name, msg):
            raise LingConfigError(f"{prefix}.{name}: {msg}")

        check_fields(self, prefix)
        for name in ("tp", "pp", "ep", "cp"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                bad(name, f"must be an integer >= 1, got {v!r}")
        if self.etp is not None and (not isinstance(self.etp, int) or self.etp < 1):
            bad("etp", f"must be an integer >= 1 or null (= tp), got {self.etp!r}")
        if self.vpp is not None:
            if not isinstance(self.vpp, int) or self.vpp < 1:
                bad("vpp", f"must be an integer >= 1 or null, got {self.vpp!r}")
            if self.vpp > 1 and self.pp < 2:
                bad("vpp", f"virtual pipeline stages need pp >= 2 (got pp={self.pp}); set vpp: null")
        if self.moe_token_dispatcher not in ("allgather", "alltoall", "flex"):
            bad("moe_token_dispatcher", f"must be allgather, alltoall or flex, got {self.moe_token_dispatcher!r}")
        # megatron-core 0.16.1: with TP>1, EP=1 and ETP=1 the expert weights are replicated over TP
        # but never all-reduced (the `allreduce` attribute is keyed on EP>1 only), so the TP ranks'
        # experts silently diverge. Refuse instead of training a broken model.
        if self.tp > 1 and self.ep == 1 and self.expert_tp == 1:
            bad("etp", f"tp={self.tp} with ep=1 and etp=1 never reduces expert gradients in megatron-core; "
                f"set etp: null (= tp) or ep > 1")
        # megatron-core moe_layer.py raises at the first training step for MoE+TP without SP.
        if self.tp > 1 and self.sp is False and self.ep * self.expert_tp > 1:
            bad("sp", f"MoE training with tp={self.tp} requires sequence parallelism; set sp: true (or null)")
        if self.pipeline_layout and self.pipeline_layout != "auto" and (
                self.num_layers_in_first_pipeline_stage or self.num_layers_in_last_pipeline_stage):
            bad("pipeline_layout", "give either a layout string or num_layers_in_first/last_pipeline_stage, not both")
        # megatron-core 0.16.1 divides by zero computing the middle stages when VPP is used at
        # PP=2 with both first and last stage counts given (nothing is left in the middle).
        if (self.pp == 2 and (self.vpp or 1) > 1 and self.num_layers_in_first_pipeline_stage is not None
                and self.num_layers_in_last_pipeline_stage is not None):
            bad("pipeline_layout", "with pp=2 and vpp>1, megatron-core cannot take both first and last stage "
                "layer counts (ZeroDivisionError); express the split as a pipeline_layout string instead")
        if world_size is not None:
            mp = self.model_parallel_size()
            if world_size % mp:
                bad("tp", f"world size {world_size} is not divisible by tp*pp*cp = {self.tp}*{self.pp}*{self.cp} = {mp}; "
                    f"change tp/pp/cp or the number of processes")
            # expert grid: ETP * EP * EDP must equal TP * CP * DP
            dense = world_size // self.pp
            if dense % (self.expert_tp * self.ep):
                bad("ep", f"ep*etp = {self.ep}*{self.expert_tp} must divide world_size/pp = {dense}; "
                    f"change ep/etp or the number of processes")
        return self
