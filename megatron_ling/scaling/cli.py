"""``ling-plan hparams`` and ``ling-plan memory`` (sub-commands of ling-plan, see profiling/plan_cli.py).

  ling-plan hparams --compute 1e22 [--preset ling-mini-2.0 | --hf-config DIR] [--json]
  ling-plan hparams --preset ling-flash-2.0 --tokens 20e12 [--seq-length 4096]   # C = M * D
  ling-plan memory RECIPE [--world-size N] [key=value ...] [--json]
"""
from __future__ import annotations

import json
import math

from megatron_ling.errors import LingConfigError

GiB = 1024 ** 3


def add_parsers(sub) -> None:
    h = sub.add_parser("hparams", help="scaling-law LR, batch, compute-optimal split and efficiency leverage")
    h.add_argument("--compute", default=None, help="compute budget C in FLOPs (e.g. 1e22)")
    h.add_argument("--tokens", default=None, help="training tokens D (with a model: C = M * D)")
    h.add_argument("--preset", default=None, help="model preset to evaluate (its M, A, G and EL at C)")
    h.add_argument("--hf-config", default=None, help="HF model directory or config.json instead of a preset")
    h.add_argument("--seq-length", type=int, default=4096, help="sequence length for the attention FLOPs in M")
    h.add_argument("--json", action="store_true")
    m = sub.add_parser("memory", help="per-rank parameter, gradient, optimizer and activation bytes of a recipe")
    m.add_argument("recipe", help="recipe YAML or built-in recipe name (quickstart)")
    m.add_argument("overrides", nargs="*", help="dotted.key=value recipe overrides")
    m.add_argument("--world-size", type=int, default=None, help="number of ranks (default: the smallest the "
                   "layout runs on)")
    m.add_argument("--json", action="store_true")


def _number(text, flag: str) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise LingConfigError(f"{flag}: expected a positive number (e.g. 1e22), got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise LingConfigError(f"{flag}: expected a positive number (e.g. 1e22), got {text!r}")
    return v


def _model(args):
    from megatron_ling.models.config import LingConfig, get_preset

    if args.hf_config and args.preset:
        raise LingConfigError("--preset/--hf-config: give one model, not both")
    if args.hf_config:
        return LingConfig.from_hf_config(args.hf_config).validate(prefix="--hf-config")
    return get_preset(args.preset).validate() if args.preset else None


def hparams_report(args) -> dict:
    from megatron_ling.scaling import laws as S
    from megatron_ling.models.config import get_preset

    if args.seq_length < 1:
        raise LingConfigError(f"--seq-length: must be >= 1, got {args.seq_length}")
    cfg = _model(args)
    if args.compute is not None and args.tokens is not None:
        raise LingConfigError("--compute/--tokens: give the compute budget or the tokens (with a model), not both")
    if args.compute is None and args.tokens is None:
        raise LingConfigError("--compute: give a compute budget C in FLOPs (e.g. --compute 1e22), or a model "
                              "(--preset) and --tokens")
    if args.tokens is not None:
        if cfg is None:
            raise LingConfigError("--tokens: needs a model (--preset or --hf-config) to turn tokens into FLOPs")
        c = S.non_embedding_flops_per_token(cfg, args.seq_length) * _number(args.tokens, "--tokens")
    else:
        c = _number(args.compute, "--compute")
    hp = S.hparams(c)
    out = {"compute": c, "lr_opt": hp.lr_opt, "batch_opt_tokens": hp.batch_opt_tokens, "moe_m_opt": hp.m_opt,
           "moe_d_opt": hp.d_opt, "dense_m_opt": hp.dense_m_opt, "dense_d_opt": hp.dense_d_opt,
           "in_fitted_range": hp.in_fitted_range, "seq_length": args.seq_length}
    rows = {}
    for name in S.PUBLISHED:
        rows[name] = get_preset(name)
    if cfg is not None:
        rows = {"model": cfg, **rows}
    out["configs"] = {}
    for name, m in rows.items():
        a, g = S.activation_ratio(m), S.granularity(m)
        row = {"activation_ratio": a, "granularity": g, "m_flops_per_token": S.non_embedding_flops_per_token(m, args.seq_length),
               "efficiency_leverage": S.efficiency_leverage(a, g, c)}
        if name in S.PUBLISHED:
            row["published_lr"], row["published_batch_sequences"] = S.PUBLISHED[name]
        out["configs"][name] = row
    return out


def format_hparams(r: dict) -> str:
    lines = [f"compute C = {r['compute']:.4g} FLOPs (M = non-embedding training FLOPs per token at seq {r['seq_length']})",
             f"  optimal peak LR      eta_opt = 1.1576 C^-0.1529 = {r['lr_opt']:.4g}",
             f"  optimal batch        B_opt   = 0.0694 C^0.3644  = {r['batch_opt_tokens']:.4g} tokens "
             f"({r['batch_opt_tokens'] / 4096:.0f} x 4096-token sequences)",
             f"  MoE compute-optimal  M_opt = {r['moe_m_opt']:.4g} FLOPs/token, D_opt = {r['moe_d_opt']:.4g} tokens",
             f"  dense (reference)    M_opt = {r['dense_m_opt']:.4g} FLOPs/token, D_opt = {r['dense_d_opt']:.4g} tokens"]
    if not r["in_fitted_range"]:
        lines.append("  note: C is outside the laws' fitted range 3e17-3e20 FLOPs; these are extrapolations")
    lines.append("")
    lines.append(f"  {'config':<16} {'A':>7} {'G':>6} {'M FLOPs/tok':>12} {'EL at C':>8} {'published LR':>13} "
                 f"{'published batch':>16}")
    for name, x in r["configs"].items():
        pub_lr = f"{x['published_lr']:.3g}" if "published_lr" in x else "-"
        pub_b = f"{x['published_batch_sequences']:,} seq" if "published_batch_sequences" in x else "-"
        lines.append(f"  {name:<16} {100 * x['activation_ratio']:>6.2f}% {x['granularity']:>6.1f} "
                     f"{x['m_flops_per_token']:>12.4g} {x['efficiency_leverage']:>8.2f} {pub_lr:>13} {pub_b:>16}")
    lines.append("  (published: Ling 2.0 report Table 1; batch in sequences)")
    return "\n".join(lines)


def memory_report(args) -> list:
    from megatron_ling.scaling.memory import estimate_memory
    from megatron_ling.training.recipe import load_recipe

    if args.world_size is not None and args.world_size < 1:
        raise LingConfigError(f"--world-size: must be >= 1, got {args.world_size}")
    return estimate_memory(load_recipe(args.recipe, args.overrides), args.world_size)


def run(args) -> int:
    if args.cmd == "hparams":
        r = hparams_report(args)
        print(json.dumps(r, indent=2) if args.json else format_hparams(r))
        return 0
    ranks = memory_report(args)
    if args.json:
        print(json.dumps([{**vars(m), "total_bytes": m.total_bytes} for m in ranks], indent=2))
        return 0
    print(f"{'pp rank':>7} {'params':>12} {'weights GiB':>11} {'grads GiB':>10} {'optimizer GiB':>13} "
          f"{'activations GiB':>15} {'total GiB':>10}")
    for m in ranks:
        print(f"{m.pp_rank:>7} {m.params:>12,.0f} {m.param_bytes / GiB:>11.3f} {m.grad_bytes / GiB:>10.3f} "
              f"{m.optimizer_bytes / GiB:>13.3f} {m.activation_bytes / GiB:>15.3f} {m.total_bytes / GiB:>10.3f}")
    print("(per rank of each pipeline stage; activations: 1F1B micro batches in flight, analytic estimate)")
    return 0
