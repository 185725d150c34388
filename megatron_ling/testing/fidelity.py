"""Parallel-fidelity scenarios: train a tiny Ling model for a few steps under a parallel layout and
record what must not depend on the layout (run inside ranks forked by the harness).

* :func:`reference_run` (1 rank): builds the model, records the initial full weights, the logits of
  a fixed evaluation batch before and after training, per-step loss / grad norm / MTP loss, and the
  final full weights and expert biases.
* :func:`layout_run` (N ranks): builds the layout, loads the reference's initial full weights
  (layouts do not reproduce one initialisation), trains on the same global batches -- each data
  parallel rank gets its share of every global batch, as in real training -- and records the same
  things. :func:`compare` turns the two records into max differences.

Everything goes through megatron-ling's own setup (``build_model`` / ``build_optimizer`` /
``train_step``), i.e. what ``ling-train`` runs, so the tests check the real wiring.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class Scenario:
    """Model, precision and data of a fidelity run (shared by the reference and the layouts)."""

    preset: str = "ling-tiny"
    model: dict = field(default_factory=dict)  # LingConfig.replace(**model)
    options: dict = field(default_factory=dict)  # ModelOptions(**options)
    precision: str = "fp32"
    steps: int = 3
    global_microbatches: int = 4  # per global batch; each DP rank runs global_microbatches / dp
    micro_batch_size: int = 2
    seq_length: int = 32
    lr: float = 1e-3
    clip_grad: float = 1.0
    init_seed: int = 42
    data_seed: int = 0

    def ling(self):
        from megatron_ling.models.config import get_preset

        return get_preset(self.preset, **self.model)

    def model_options(self):
        from megatron_ling.models.options import ModelOptions

        return ModelOptions(precision=self.precision, **self.options)

    def key(self) -> tuple:
        return tuple(sorted((k, repr(v)) for k, v in dataclasses.asdict(self).items()))


def microbatch(seed: int, mbs: int, seq: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, (mbs, seq + 1), generator=g)
    return dict(tokens=t[:, :-1].contiguous(), labels=t[:, 1:].contiguous(), loss_mask=torch.ones(mbs, seq),
                position_ids=torch.arange(seq).unsqueeze(0).expand(mbs, -1).contiguous())


def global_batch(sc: Scenario, step: int, vocab: int) -> list:
    base = sc.data_seed * 100_000 + 100 * step
    return [microbatch(base + i, sc.micro_batch_size, sc.seq_length, vocab) for i in range(sc.global_microbatches)]


def eval_batch(sc: Scenario, vocab: int) -> list:
    """Fixed evaluation micro-batches (the same on every data-parallel rank)."""
    return [microbatch(sc.data_seed * 100_000 + 99_000 + i, sc.micro_batch_size, sc.seq_length, vocab)
            for i in range(4)]  # 4: interleaved schedules need at least pp micro-batches


def dp_share(mbs: list) -> list:
    """This data-parallel rank's contiguous share of a global batch's micro-batches."""
    from megatron.core import parallel_state as ps

    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    if len(mbs) % dp:
        raise ValueError(f"{len(mbs)} micro-batches do not split over data parallel size {dp}")
    n = len(mbs) // dp
    return mbs[r * n:(r + 1) * n]


def _clear_trackers() -> None:
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    if "values" in MTPLossLoggingHelper.tracker:
        MTPLossLoggingHelper.clean_loss_in_tracker()
    clear_aux_losses_tracker()


@torch.no_grad()
def eval_logits(bundle, sc: Scenario, vocab: int) -> Optional[torch.Tensor]:
    """Logits of every output-layer call (MTP heads and the main head, per micro-batch) of a
    forward-only pass over the fixed evaluation batch, full vocabulary, fp32, [n, s, b, V]; None on
    ranks without the output layer."""
    from megatron.core import parallel_state as ps

    from megatron_ling.parallel.weights import unwrap
    from megatron_ling.training.step import run_forward_backward

    captured, hooks = [], []
    for c in bundle.chunks:
        m = unwrap(c)
        if getattr(m, "post_process", False) and getattr(m, "output_layer", None) is not None:
            hooks.append(m.output_layer.register_forward_hook(lambda mod, i, o: captured.append(o[0].detach())))
    for c in bundle.chunks:
        c.eval()
    try:
        run_forward_backward(bundle, eval_batch(sc, vocab), sc.seq_length, sc.micro_batch_size, forward_only=True)
    finally:
        for c in bundle.chunks:
            c.train()
        for h in hooks:
            h.remove()
        _clear_trackers()
    if not captured:
        return None
    logits = torch.stack(captured).float()
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        torch.distributed.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    return logits


def _bias_dtypes(bundle) -> list:
    from megatron_ling.models.expert_bias import routers

    return sorted({str(r.expert_bias.dtype) for r in routers(bundle.chunks)})


def _train(bundle, optimizer, sc: Scenario, vocab: int, start: int = 0, steps: Optional[int] = None) -> list:
    from megatron_ling.training.step import train_step

    out = []
    for s in range(start, start + (sc.steps if steps is None else steps)):
        r = train_step(bundle, optimizer, dp_share(global_batch(sc, s, vocab)), sc.seq_length, sc.micro_batch_size)
        out.append(dict(loss=r.lm_loss, grad_norm=r.grad_norm, mtp=r.extra.get("mtp_1_loss"),
                        tokens=r.num_tokens, ok=r.update_successful))
    return out


def build(sc: Scenario, parallel: dict, full: Optional[dict] = None, world: Optional[int] = None,
          validate: bool = True):
    """(bundle, optimizer, ParallelConfig) for ``parallel`` (ParallelConfig fields), with the full
    weights ``full`` loaded before the optimizer is built."""
    from megatron_ling.parallel.config import ParallelConfig
    from megatron_ling.parallel.weights import load_full_state_dict
    from megatron_ling.training.setup import build_model, build_optimizer, init_model_parallel

    par = ParallelConfig(**parallel)
    if validate:
        par.validate(world or torch.distributed.get_world_size())
    ling, opts = sc.ling(), sc.model_options()
    init_model_parallel(par, seed=1234, tied_embeddings=ling.tie_word_embeddings)
    bundle = build_model(ling, par, opts, init_seed=sc.init_seed)
    if full is not None:
        load_full_state_dict(bundle.chunks, full)
    optimizer = build_optimizer(bundle, par, opts, lr=sc.lr, min_lr=sc.lr, clip_grad=sc.clip_grad)
    return bundle, optimizer, par


def reference_run(ctx, scenario: Scenario) -> dict:
    """Single-process run (world 1)."""
    from megatron_ling.parallel.weights import gather_full_state_dict

    sc = scenario
    vocab = sc.ling().vocab_size
    bundle, optimizer, _ = build(sc, dict(distributed_optimizer=False))
    full0 = gather_full_state_dict(bundle.chunks)
    logits0 = eval_logits(bundle, sc, vocab)
    steps = _train(bundle, optimizer, sc, vocab)
    return dict(full0=full0, logits0=logits0, steps=steps, logits=eval_logits(bundle, sc, vocab),
                full=gather_full_state_dict(bundle.chunks), bias_dtypes=_bias_dtypes(bundle))


_REFERENCES: dict = {}


def reference(scenario: Scenario, timeout_s: float = 300) -> dict:
    """The single-process run of ``scenario`` (computed once per calling process, in a forked rank)."""
    from megatron_ling.testing.harness import run_ranks

    key = scenario.key()
    if key not in _REFERENCES:
        _REFERENCES[key] = run_ranks(reference_run, 1, dict(scenario=scenario), timeout_s=timeout_s)[0]
    return _REFERENCES[key]


def layout_run(ctx, scenario: Scenario, parallel: dict, full0: dict, validate: bool = True,
               gather: bool = True) -> dict:
    """One rank of a parallel layout, from the reference's initial weights ``full0``."""
    from megatron.core import parallel_state as ps

    from megatron_ling.parallel.weights import gather_full_state_dict

    sc = scenario
    vocab = sc.ling().vocab_size
    bundle, optimizer, _ = build(sc, parallel, full0, validate=validate)
    logits0 = eval_logits(bundle, sc, vocab)
    steps = _train(bundle, optimizer, sc, vocab)
    logits = eval_logits(bundle, sc, vocab)
    full = gather_full_state_dict(bundle.chunks, dst=0) if gather else None
    return dict(rank=ctx.rank, logits0=logits0, logits=logits, steps=steps, full=full,
                bias_dtypes=_bias_dtypes(bundle),
                groups=dict(tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
                            dp=ps.get_data_parallel_world_size(), ep=ps.get_expert_model_parallel_world_size(),
                            etp=ps.get_expert_tensor_parallel_world_size()),
                layers=[[l.layer_number for l in getattr(getattr(c, "decoder", None), "layers", [])]
                        for c in map(_unwrap, bundle.chunks)],
                mtp=[bool(getattr(_unwrap(c), "mtp_process", False)) for c in bundle.chunks])


def _unwrap(c):
    from megatron_ling.parallel.weights import unwrap

    return unwrap(c)


# ------------------------------------------------------------------------------ comparison
def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def compare(ref: dict, ranks: list) -> dict:
    """Max differences of a layout run (the per-rank results) against the reference:
    logits (abs, over every rank that holds the output layer), per-step loss / grad norm / MTP
    loss (relative, every rank), final full weights (abs)."""
    d = dict(logits0=0.0, logits=0.0, loss=0.0, grad_norm=0.0, mtp=0.0, expert_bias=0.0, weights=0.0, weights_key=None,
             n_logit_ranks=0, tokens_ok=True)
    for r in ranks:
        if r["logits"] is not None:
            d["n_logit_ranks"] += 1
            for k in ("logits0", "logits"):
                if r[k].shape != ref[k].shape:
                    raise AssertionError(f"{k}: shape {tuple(r[k].shape)} vs reference {tuple(ref[k].shape)}")
                d[k] = max(d[k], (r[k] - ref[k]).abs().max().item())
        if len(r["steps"]) != len(ref["steps"]):
            raise AssertionError(f"{len(r['steps'])} steps vs {len(ref['steps'])}")
        for a, b in zip(r["steps"], ref["steps"]):
            d["loss"] = max(d["loss"], rel(a["loss"], b["loss"]))
            d["grad_norm"] = max(d["grad_norm"], rel(a["grad_norm"], b["grad_norm"]))
            if b["mtp"] is not None:
                d["mtp"] = max(d["mtp"], rel(a["mtp"], b["mtp"]))
            d["tokens_ok"] &= a["tokens"] == b["tokens"] and a["ok"]
    full = ranks[0].get("full")
    if full is not None:
        if set(full) != set(ref["full"]):
            raise AssertionError(f"gathered names differ: {sorted(set(full) ^ set(ref['full']))[:5]}")
        for k, v in full.items():
            diff = (v.float() - ref["full"][k].float()).abs().max().item()
            if k.endswith("expert_bias"):
                d["expert_bias"] = max(d["expert_bias"], diff)
            if diff >= d["weights"]:
                d["weights"], d["weights_key"] = diff, k
    return d
