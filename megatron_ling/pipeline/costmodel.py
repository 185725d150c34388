"""Per-scheduling-unit cost model for Ling 2.0 pipeline planning.

Scheduling units (FACTS §4, Ling 2.0 report §5.2):

  E      embedding lookup (first stage)
  D      dense decoder layer (the first ``first_k_dense_replace`` layers)
  M      MoE decoder layer
  MTP_T  transformer part of an MTP layer: enorm/hnorm, eh_proj [2H->H], one MoE layer, final norm
  MTP_L  loss part of an MTP layer: its own output projection over the vocabulary + cross entropy
  L      final norm + output layer + cross entropy (157k vocabulary on the released models)

For each unit the model gives forward/backward FLOPs per micro batch (per rank, i.e. already
divided by TP and CP), activation bytes kept for the backward pass, and parameter (+grad +
optimizer) bytes. Times are FLOPs / achieved throughput, plus the MoE all-to-all for EP > 1; a
``Calibration`` (measured seconds per unit type on real hardware, ``ling-plan calibrate``) replaces
the throughput by the measured per-unit-type efficiency, so a calibration taken at one shape
transfers to another shape of the same unit type.

In a megatron-core layout string the units map to letters: E -> 'E', D/M -> 't', MTP_T+MTP_L -> 'm'
(megatron-core 0.16.1 computes the MTP loss inside the MTP block, on the stage that owns 'L'),
L -> 'L'.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from megatron_ling.errors import LingConfigError
from megatron_ling.models.config import LingConfig

UNIT_TYPES = ("E", "D", "M", "MTP_T", "MTP_L", "L")


@dataclass(frozen=True)
class UnitCost:
    """Cost of one scheduling unit for one micro batch on one rank."""

    kind: str
    fwd_flops: float
    bwd_flops: float  # includes the recomputed forward when the unit is recomputed
    act_bytes: float  # activations held from forward until backward, per micro batch
    param_bytes: float  # weights + grads + optimizer state on this rank
    comm_s: float = 0.0  # per-direction communication inside the unit (MoE all-to-all)
    fwd_s: float = 0.0  # filled by CostModel.unit(): time of the forward
    bwd_s: float = 0.0

    @property
    def time_s(self) -> float:
        return self.fwd_s + self.bwd_s


@dataclass
class Hardware:
    """Analytic throughput assumptions (used when no calibration is given).

    Defaults: a Hopper GPU at bf16 (989 TFLOP/s dense peak) with 45% achieved on GEMMs, the figure
    a well-tuned Megatron MoE run reaches at best; NVLink-class all-to-all bandwidth for EP.
    """

    name: str = "hopper-bf16-analytic"
    peak_flops: float = 989e12
    efficiency: float = 0.45
    a2a_bandwidth: float = 150e9  # bytes/s, per rank, for the EP all-to-all
    p2p_latency_s: float = 20e-6  # pipeline send/recv latency
    p2p_bandwidth: float = 40e9  # bytes/s between pipeline stages (cross-node IB)
    min_unit_s: float = 20e-6  # launch floor for tiny units (embedding lookup, norms)

    @property
    def achieved(self) -> float:
        return self.peak_flops * self.efficiency


@dataclass
class Calibration:
    """Measured seconds per unit type, taken at a reference shape.

    ``units[kind] = {"fwd_s": ..., "bwd_s": ..., "fwd_flops": ..., "bwd_flops": ...}``: the flops
    are the analytic ones at the measured shape, so ``seconds / flops`` is the measured efficiency
    of that unit type, applied to any other shape. ``p2p_latency_s`` is the measured p2p time.
    """

    units: dict
    p2p_latency_s: float = 0.0
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": "megatron-ling-calibration/1", "units": self.units,
                "p2p_latency_s": self.p2p_latency_s, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict, source: str = "calibration") -> "Calibration":
        if d.get("format") != "megatron-ling-calibration/1":
            raise LingConfigError(f"{source}: not a megatron-ling calibration file (format "
                                  f"{d.get('format')!r}); create one with `ling-plan calibrate`")
        units = d.get("units") or {}
        for k, v in units.items():
            if k not in UNIT_TYPES:
                raise LingConfigError(f"{source}: unknown unit type {k!r}; expected one of {UNIT_TYPES}")
            for f in ("fwd_s", "bwd_s", "fwd_flops", "bwd_flops"):
                if not isinstance(v.get(f), (int, float)) or v[f] < 0:
                    raise LingConfigError(f"{source}: units.{k}.{f} must be a number >= 0")
        return cls(units=units, p2p_latency_s=float(d.get("p2p_latency_s", 0.0)), meta=d.get("meta", {}))

    def save(self, path: str, force: bool = False) -> None:
        if os.path.exists(path) and not force:
            raise LingConfigError(f"--out: {path} exists; pass --force to overwrite")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "Calibration":
        if not os.path.exists(path):
            raise LingConfigError(f"--calibration: {path} does not exist; create it with `ling-plan calibrate`")
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise LingConfigError(f"--calibration: {path} is not JSON ({e})") from None
        return cls.from_dict(d, source=path)


@dataclass
class CostOptions:
    seq_length: int = 4096
    micro_batch_size: int = 1
    tp: int = 1
    ep: int = 1
    cp: int = 1
    recompute: str = "none"  # none | full | mtp (partial: recompute MTP_T, keep MTP_L logits)
    act_bytes: int = 2  # bf16 activations
    # weights bf16 (2) + fp32 main grad (4) + fp32 master/Adam m/v (12) sharded by the distributed
    # optimizer over DP; dp=1 means no sharding.
    weight_bytes: int = 2
    grad_bytes: int = 4
    optim_bytes: int = 12
    dp: int = 1

    def validate(self) -> "CostOptions":
        for name in ("seq_length", "micro_batch_size", "tp", "ep", "cp", "dp"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise LingConfigError(f"--{name.replace('_', '-')}: must be an integer >= 1, got {v!r}")
        if self.recompute not in ("none", "full", "mtp"):
            raise LingConfigError(f"--recompute: must be none, full or mtp, got {self.recompute!r}")
        if self.seq_length % self.cp:
            raise LingConfigError(f"--seq-length {self.seq_length} is not divisible by cp={self.cp}")
        return self


class CostModel:
    """Costs of the scheduling units of one Ling config at one parallel shape."""

    def __init__(self, cfg: LingConfig, opts: CostOptions, hardware: Optional[Hardware] = None,
                 calibration: Optional[Calibration] = None):
        self.cfg = cfg
        self.opts = opts.validate()
        self.hw = hardware or Hardware()
        self.cal = calibration
        self._cache: dict = {}

    # ---------------------------------------------------------------- flops (per micro batch)
    @property
    def tokens(self) -> int:
        """Tokens one rank processes per micro batch (CP splits the sequence)."""
        return self.opts.seq_length // self.opts.cp * self.opts.micro_batch_size

    def _attn_flops(self) -> float:
        c, s = self.cfg, self.opts.seq_length
        proj = 2 * c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
        proj += 2 * c.num_attention_heads * c.head_dim * c.hidden_size
        # QK^T and AV, causal: half of 2 * 2 * s * heads * head_dim per token
        core = 2 * s * c.num_attention_heads * c.head_dim
        return proj + core

    def _moe_mlp_flops(self) -> float:
        c = self.cfg
        expert = 2 * 3 * c.hidden_size * c.moe_intermediate_size
        return c.num_experts_per_tok * expert + c.num_shared_experts * expert + 2 * c.hidden_size * c.num_experts

    def _logits_flops(self) -> float:
        # output projection + softmax/cross entropy (~5 flops per logit)
        return 2 * self.cfg.hidden_size * self.cfg.vocab_size + 5 * self.cfg.vocab_size

    def flops_per_token(self, kind: str) -> float:
        """Forward FLOPs per token of a unit, before TP division."""
        c = self.cfg
        if kind == "E":
            return 0.0
        if kind == "D":
            return self._attn_flops() + 2 * 3 * c.hidden_size * c.intermediate_size
        if kind == "M":
            return self._attn_flops() + self._moe_mlp_flops()
        if kind == "MTP_T":
            return 2 * 2 * c.hidden_size * c.hidden_size + self._attn_flops() + self._moe_mlp_flops()
        if kind in ("MTP_L", "L"):
            return self._logits_flops()
        raise LingConfigError(f"unit: unknown unit type {kind!r}; expected one of {UNIT_TYPES}")

    # ----------------------------------------------------------------------- memory
    def _act_bytes_per_token(self, kind: str) -> float:
        """Activation elements saved for backward per token (no recompute), times bytes."""
        c, b = self.cfg, self.opts.act_bytes
        h, hd = c.hidden_size, c.head_dim
        attn = 2 * h + (2 * c.num_attention_heads + 2 * c.num_key_value_heads) * hd  # norm in/out, q,k,v, ctx
        if kind == "E":
            return 0.0
        if kind == "D":
            return b * (attn + h + 3 * c.intermediate_size)
        moe = h + 2 * c.num_experts + c.num_experts_per_tok * (h + 3 * c.moe_intermediate_size)
        moe += c.num_shared_experts * 3 * c.moe_intermediate_size
        if kind == "M":
            return b * (attn + moe)
        if kind == "MTP_T":
            return b * (4 * h + attn + moe)
        # logits kept in fp32 for the cross entropy backward
        return b * h + 4 * c.vocab_size

    def _param_count(self, kind: str) -> float:
        c = self.cfg
        h = c.hidden_size
        attn = h * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim + c.num_attention_heads * c.head_dim * h
        expert = 3 * h * c.moe_intermediate_size
        if kind == "E":
            return c.vocab_size * h
        if kind == "D":
            return attn + 3 * h * c.intermediate_size + 2 * h
        if kind in ("M", "MTP_T"):
            # dense parts are split over TP below; routed experts are split over EP (x expert-TP = TP)
            dense = attn + 2 * h + c.num_shared_experts * expert + c.num_experts * h
            n = dense + c.num_experts * expert / self.opts.ep
            if kind == "MTP_T":
                n += 2 * h * h + 3 * h
            return n
        if kind == "MTP_L":
            return 0.0  # shares the output layer with L
        if kind == "L":
            return 0.0 if c.tie_word_embeddings else c.vocab_size * h + h
        raise LingConfigError(f"unit: unknown unit type {kind!r}")

    # ------------------------------------------------------------------------ units
    def recomputed(self, kind: str) -> bool:
        r = self.opts.recompute
        if r == "full":
            return kind in ("D", "M", "MTP_T")
        if r == "mtp":
            return kind == "MTP_T"
        return False

    def unit(self, kind: str) -> UnitCost:
        if kind in self._cache:
            return self._cache[kind]
        o = self.opts
        fwd = self.flops_per_token(kind) * self.tokens / o.tp
        bwd = 2 * fwd + (fwd if self.recomputed(kind) else 0.0)
        if kind == "E":
            bwd = 0.0
        act = self._act_bytes_per_token(kind) * self.tokens / o.tp
        if self.recomputed(kind):
            act = o.act_bytes * self.cfg.hidden_size * self.tokens / o.tp  # only the layer input
        per_param = o.weight_bytes + o.grad_bytes + o.optim_bytes / o.dp
        params = self._param_count(kind) / o.tp * per_param
        comm = 0.0
        if kind in ("M", "MTP_T") and o.ep > 1:
            # dispatch + combine of top-k token copies, (ep-1)/ep of them leave the rank
            vol = 2 * self.tokens * self.cfg.num_experts_per_tok * self.cfg.hidden_size * o.act_bytes
            comm = vol * (o.ep - 1) / o.ep / self.hw.a2a_bandwidth
        u = UnitCost(kind=kind, fwd_flops=fwd, bwd_flops=bwd, act_bytes=act, param_bytes=params, comm_s=comm)
        fwd_s, bwd_s = self._times(u)
        u = dataclasses.replace(u, fwd_s=fwd_s, bwd_s=bwd_s)
        self._cache[kind] = u
        return u

    def _times(self, u: UnitCost) -> tuple[float, float]:
        if self.cal is not None and u.kind in self.cal.units:
            m = self.cal.units[u.kind]
            return (_scale(m["fwd_s"], m["fwd_flops"], u.fwd_flops),
                    _scale(m["bwd_s"], m["bwd_flops"], u.bwd_flops))
        if self.cal is not None and u.kind == "MTP_L" and "L" in self.cal.units:
            m = self.cal.units["L"]  # same computation as the output layer
            return (_scale(m["fwd_s"], m["fwd_flops"], u.fwd_flops),
                    _scale(m["bwd_s"], m["bwd_flops"], u.bwd_flops))
        a = self.hw.achieved
        f = max(u.fwd_flops / a, self.hw.min_unit_s) + u.comm_s
        b = max(u.bwd_flops / a, self.hw.min_unit_s) + 2 * u.comm_s if u.kind != "E" else self.hw.min_unit_s
        if u.kind == "E":
            # lookup + scatter-add grad are bandwidth bound: read/write tokens*h
            f = max(self.hw.min_unit_s, self.tokens * self.cfg.hidden_size * self.opts.act_bytes / 2e12)
            b = f
        return f, b

    @property
    def p2p_latency_s(self) -> float:
        if self.cal is not None and self.cal.p2p_latency_s > 0:
            return self.cal.p2p_latency_s
        msg = self.tokens * self.cfg.hidden_size * self.opts.act_bytes / self.opts.tp
        return self.hw.p2p_latency_s + msg / self.hw.p2p_bandwidth

    # ----------------------------------------------------------------------- stages
    def layer_kind(self, layer_index: int) -> str:
        return "D" if layer_index < self.cfg.first_k_dense_replace else "M"

    def stage_units(self, stage: str, first_layer: int) -> list[str]:
        """Unit types of one stage string ('Ettt', 'tmL') whose first 't' is decoder layer
        ``first_layer`` (0-based)."""
        out, li = [], first_layer
        for ch in stage:
            if ch == "E":
                out.append("E")
            elif ch == "t":
                out.append(self.layer_kind(li))
                li += 1
            elif ch == "m":
                out += ["MTP_T", "MTP_L"]
            elif ch == "L":
                out.append("L")
        return out

    def stage_costs(self, stages: list[str]) -> list[dict]:
        """Per-stage (schedule order) fwd/bwd seconds, activation and parameter bytes."""
        res, li = [], 0
        for st in stages:
            units = self.stage_units(st, li)
            li += st.count("t")
            us = [self.unit(k) for k in units]
            res.append(dict(units=units, fwd_s=sum(u.fwd_s for u in us), bwd_s=sum(u.bwd_s for u in us),
                            act_bytes=sum(u.act_bytes for u in us), param_bytes=sum(u.param_bytes for u in us)))
        return res


def _scale(measured_s: float, measured_flops: float, flops: float) -> float:
    if measured_flops <= 0:
        return measured_s  # flop-free unit (embedding): the measured time is the time
    return measured_s * flops / measured_flops


# Megatron's selective-recompute modules -> the GEMM FLOPs (per token, forward) they recompute.
# layernorm / moe_act recompute elementwise work only; mla_up_proj does not exist in Ling.
_SELECTIVE = ("core_attn", "mlp", "moe", "shared_experts", "layernorm", "moe_act")


def training_flops_per_token(cfg: LingConfig, seq_length: int, recompute: Optional[str] = None,
                             recompute_modules: Optional[list] = None) -> float:
    """Forward + backward FLOPs per trained token of the whole model (every rank together), from
    the per-unit counts above: 3x the forward (the backward is 2x), MTP layers included, plus the
    forward again of whatever activation recompute recomputes (``recompute`` and
    ``recompute_modules`` as in ModelOptions: None | "full" | "selective"). Multiplied by the
    tokens of an iteration this is the FLOPs behind Megatron-LM's "TFLOP/s/GPU" (``None``: the
    model FLOPs an MFU counts)."""
    cm = CostModel(cfg, CostOptions(seq_length=seq_length, recompute="full" if recompute == "full" else "none"))
    k, n_mtp = cfg.first_k_dense_replace, cfg.num_nextn_predict_layers
    kinds = ["D"] * k + ["M"] * (cfg.num_hidden_layers - k) + ["MTP_T", "MTP_L"] * n_mtp + ["L"]
    fwd = sum(cm.flops_per_token(u) for u in kinds)
    extra = sum(cm.flops_per_token(u) for u in kinds if cm.recomputed(u))
    if recompute == "selective":
        mods = set(recompute_modules or ["core_attn"])
        bad = sorted(mods - set(_SELECTIVE))
        if bad:
            raise LingConfigError(f"model.recompute_modules: {bad[0]!r} is not a megatron-core recompute module "
                                  f"for Ling; choose from {', '.join(_SELECTIVE)}")
        c = cfg
        n_moe = cfg.num_hidden_layers - k + n_mtp
        expert = 2 * 3 * c.hidden_size * c.moe_intermediate_size
        if "core_attn" in mods:
            extra += (cfg.num_hidden_layers + n_mtp) * 2 * seq_length * c.num_attention_heads * c.head_dim
        if "mlp" in mods:
            extra += k * 2 * 3 * c.hidden_size * c.intermediate_size
        if "moe" in mods:
            extra += n_moe * cm._moe_mlp_flops()
        elif "shared_experts" in mods:
            extra += n_moe * c.num_shared_experts * expert
    return 3 * fwd + extra
