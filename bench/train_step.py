"""Per-step time of megatron-ling's training stack vs the same GPTModel trained with bare
megatron-core calls, and quick-start tokens/s.

    python bench/train_step.py [--preset ling-small] [--steps 20] [--seq 256] [--mbs 4]

Both sides: one process, same TransformerConfig, same weights, same batches, Megatron DDP +
get_megatron_optimizer + get_forward_backward_func. The Ling side adds what megatron-ling adds per
step (zero-mean expert-bias update, expert-load stats, MTP/z-loss tracking). Goal: <= 1.03x.
"""
import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("PYTHONWARNINGS", "ignore")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29617")
os.environ.setdefault("RANK", "0")
os.environ.setdefault("WORLD_SIZE", "1")

import torch  # noqa: E402


def batches(n, mbs, seq, vocab, seed):
    from megatron_ling.data.random_batches import random_microbatch as microbatch

    return [microbatch(seed * 100 + i, mbs, seq, vocab) for i in range(n)]


def bare_megatron(ling, tf_config, seq, mbs, nmb, steps, state):
    """The same model trained with megatron-core calls only."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_decoder_block_spec, get_gpt_decoder_layer_specs,
                                                          get_gpt_mtp_block_spec)
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    block = get_gpt_decoder_block_spec(tf_config, use_transformer_engine=False, normalization="RMSNorm")
    layers = get_gpt_decoder_layer_specs(tf_config, use_transformer_engine=False, normalization="RMSNorm")
    mtp = get_gpt_mtp_block_spec(tf_config, layers[-1], use_transformer_engine=False)
    m = GPTModel(tf_config, block, ling.vocab_size, ling.max_position_embeddings, position_embedding_type="rope",
                 rotary_percent=ling.partial_rotary_factor, rotary_base=ling.rope_theta, mtp_block_spec=mtp)
    m.load_state_dict(state, strict=False)
    ddp = DistributedDataParallel(tf_config, DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                  use_distributed_optimizer=True), m)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=True,
                                                 clip_grad=1.0), [ddp])
    tf_config.finalize_model_grads_func = finalize_model_grads
    tf_config.no_sync_func = ddp.no_sync
    tf_config.grad_scale_func = opt.scale_loss

    def fwd(it, model):
        b = next(it)
        out = model(b["tokens"], b["position_ids"], attention_mask=None, labels=b["labels"], loss_mask=b["loss_mask"])

        def loss(o):
            s = (o.float().reshape(-1) * b["loss_mask"].reshape(-1)).sum()
            n = b["loss_mask"].sum().int()
            return s, n, {"lm loss": torch.stack([s.detach(), n.float()])}

        return out, loss

    fbf = get_forward_backward_func()
    times = []
    for s in range(steps):
        data = batches(nmb, mbs, seq, ling.vocab_size, s)
        t = time.perf_counter()
        ddp.zero_grad_buffer()
        opt.zero_grad()
        fbf(forward_step_func=fwd, data_iterator=iter(data), model=ddp, num_microbatches=nmb, seq_length=seq,
            micro_batch_size=mbs, forward_only=False)
        opt.step()
        times.append(time.perf_counter() - t)
    return times


def ling_recipe(preset, seq, mbs, nmb, steps, run_dir):
    """The recipe of the Ling side: what ``ling-train`` would run (mock data, no checkpoints)."""
    from megatron_ling.training.recipe import recipe_from_dict

    return recipe_from_dict(dict(
        run_dir=run_dir, model=dict(preset=preset),
        training=dict(train_iters=steps, micro_batch_size=mbs, global_batch_size=mbs * nmb, seq_length=seq),
        optimizer=dict(lr=1e-3, weight_decay=0.0), lr=dict(schedule="constant"), data=dict(mock=True),
        checkpoint=dict(resume="none", save=False)))


def ling_stack(recipe, steps, state):
    """The trainer's ``setup`` and ``Session.step`` (with ``state`` loaded), timed per step."""
    from megatron_ling.training.trainer import setup

    s = setup(recipe)
    s.bundle.unwrapped[0].load_state_dict(state, strict=False)
    s.optimizer.reload_model_params()
    t_cfg = recipe.training
    times = []
    for i in range(steps):
        data = batches(s.num_microbatches, t_cfg.micro_batch_size, t_cfg.seq_length, s.ling.vocab_size, i)
        t = time.perf_counter()
        s.step(data)
        times.append(time.perf_counter() - t)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="ling-small")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--nmb", type=int, default=2)
    ap.add_argument("--quickstart-log", default="runs/quickstart/metrics.jsonl")
    a = ap.parse_args()
    import tempfile

    from megatron_ling.models.megatron_config import to_transformer_config
    from megatron_ling.training.trainer import setup

    os.environ.setdefault("LING_CPU_THREADS", os.environ.get("BENCH_THREADS", "2"))
    warm = 3
    recipe = ling_recipe(a.preset, a.seq, a.mbs, a.nmb, a.steps + warm, tempfile.mkdtemp(prefix="bench-train-step-"))
    first = setup(recipe)  # the weights both sides start from
    state = {k: v.clone() for k, v in first.bundle.unwrapped[0].state_dict().items()
             if not k.endswith("_extra_state")}
    ling, par, opts = first.ling, recipe.parallel, recipe.model.options()
    del first
    rows = []
    for rep in range(2):  # alternate to spread machine noise over both sides
        lt = ling_stack(recipe, a.steps + warm, state)
        bt = bare_megatron(ling, to_transformer_config(ling, par, opts), a.seq, a.mbs, a.nmb, a.steps + warm, state)
        rows.append((statistics.median(lt[warm:]), statistics.median(bt[warm:])))
    ling_t = min(r[0] for r in rows)
    bare_t = min(r[1] for r in rows)
    tokens = a.seq * a.mbs * a.nmb
    print(f"\n{a.preset}, 1 process, {a.nmb} x {a.mbs} x {a.seq} tokens/step, median of {a.steps} steps (best of 2 runs)")
    print(f"| {'stack':28s} | {'step time (s)':>13s} | {'tokens/s':>9s} | {'ratio':>6s} |")
    print(f"|{'-' * 30}|{'-' * 15}|{'-' * 11}|{'-' * 8}|")
    print(f"| {'bare megatron-core calls':28s} | {bare_t:13.4f} | {tokens / bare_t:9.0f} | {1.0:6.3f} |")
    print(f"| {'megatron-ling (Ling stack)':28s} | {ling_t:13.4f} | {tokens / ling_t:9.0f} | {ling_t / bare_t:6.3f} |")
    print(f"goal: ratio <= 1.03 -> {'met' if ling_t / bare_t <= 1.03 else 'NOT met'}")
    if os.path.exists(a.quickstart_log):
        import json

        recs = [json.loads(l) for l in open(a.quickstart_log)]
        tps = statistics.median(r["tokens_per_s"] for r in recs[1:]) if len(recs) > 1 else recs[0]["tokens_per_s"]
        print(f"quick start (2 processes, TP2+SP x EP2, from {a.quickstart_log}): {tps:.0f} tokens/s median")
    return 0


if __name__ == "__main__":
    sys.exit(main())
