"""SFT throughput with and without packing on the quick-start-sized model (ling-tiny), one process.

    python bench/sft.py [--steps 5] [--seq 256] [--mbs 4] [--convs 400]

Same conversations (generated offline, Ling-shaped chat template), same model and optimizer; each
step is a real megatron-core forward/backward + optimizer step through megatron-ling's SFT path
(CPU: explicit per-conversation mask; GPU+TE: THD). Prints positions/s, assistant tokens/s and the
padding fraction of each way.
"""
import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("PYTHONWARNINGS", "ignore")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29631")
os.environ.setdefault("RANK", "0")
os.environ.setdefault("WORLD_SIZE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy  # noqa: E402
import torch  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--convs", type=int, default=400)
    a = ap.parse_args()
    from tests.support import sft as S

    from megatron_ling.data.chat import preprocess_chat
    from megatron_ling.data.packing import ChatDataset
    from megatron_ling.models.config import get_preset
    from megatron_ling.models.options import ModelOptions
    from megatron_ling.parallel.config import ParallelConfig
    from megatron_ling.training.setup import (build_model, build_optimizer, init_distributed, init_model_parallel,
                                              prepare_process)
    from megatron_ling.training.sft import chat_forward_step, thd_available
    from megatron_ling.training.step import train_step

    work = tempfile.mkdtemp(prefix="bench_sft")
    tok = S.make_chat_tokenizer(os.path.join(work, "tok"))
    S.write_conversations(os.path.join(work, "c.jsonl"), a.convs, seed=3)
    prefix = preprocess_chat([os.path.join(work, "c.jsonl")], os.path.join(work, "c"), tok, a.seq,
                             progress=False).prefix
    prepare_process()
    init_distributed()
    pc = ParallelConfig()
    ling = get_preset("ling-tiny")
    init_model_parallel(pc, ling)
    opts = ModelOptions()
    bundle = build_model(ling, pc, opts, tf_overrides={"calculate_per_token_loss": True})
    opt = build_optimizer(bundle, pc, opts, lr=1e-4)
    n = a.steps * a.mbs
    print(f"ling-tiny, seq {a.seq}, micro-batch {a.mbs}, {a.steps} timed steps (+1 warm-up), "
          f"{'THD/TE' if thd_available() else 'CPU mask'} path, {torch.get_num_threads()} threads")
    print(f"{'packing':8s} {'padding':>8s} {'positions/s':>12s} {'assistant tok/s':>16s}")
    for packing in (False, True):
        ds = ChatDataset([prefix], numpy.arange(a.convs), a.seq, 0, packing=packing, num_samples=n + a.mbs)
        mbs = [S._collate([ds[j] for j in range(i, i + a.mbs)]) for i in range(0, n + a.mbs, a.mbs)]
        train_step(bundle, opt, [mbs[0]], a.seq, a.mbs, step_fn=chat_forward_step)  # warm-up
        t0, toks = time.perf_counter(), 0
        for b in mbs[1:]:
            r = train_step(bundle, opt, [b], a.seq, a.mbs, step_fn=chat_forward_step)
            toks += r.num_tokens
        dt = time.perf_counter() - t0
        used = sum(int(ds.lengths[ds.bins[j]].sum()) for j in range(a.mbs, n + a.mbs))  # timed samples
        pad = 1.0 - used / (n * a.seq)
        print(f"{str(packing):8s} {pad:8.3f} {n * a.seq / dt:12.0f} {toks / dt:16.0f}")


if __name__ == "__main__":
    main()
