"""SFT throughput with and without packing on the quick-start-sized model (ling-tiny), one process.

    python bench/sft.py [--steps 5] [--seq 256] [--mbs 4] [--convs 400]

Same conversations (generated offline, Ling-shaped chat template), same model preset; each way is
a chat-data Recipe run through the trainer's own ``setup()`` and ``Session.step`` (what
``ling-train`` runs per step: megatron-core forward/backward + optimizer + LR schedule; CPU:
explicit per-conversation mask, GPU+TE: THD). Prints positions/s, assistant tokens/s and the
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

import torch  # noqa: E402


def sft_recipe(work, prefix, tok, packing, steps, seq, mbs):
    """What ``ling-train`` would run on the chat prefix (no eval, no checkpoints)."""
    from megatron_ling.training.recipe import recipe_from_dict

    return recipe_from_dict(dict(
        run_dir=os.path.join(work, f"run-packing-{packing}"), model=dict(preset="ling-tiny"),
        training=dict(train_iters=steps, micro_batch_size=mbs, global_batch_size=mbs, seq_length=seq),
        optimizer=dict(lr=1e-4), lr=dict(schedule="constant"),
        data=dict(format="chat", paths=[prefix], tokenizer=tok, split="100,0,0", packing=packing),
        checkpoint=dict(resume="none", save=False)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--convs", type=int, default=400)
    a = ap.parse_args()
    from tests.support import sft as S

    from megatron_ling.data.chat import preprocess_chat
    from megatron_ling.data.packing import build_chat_datasets
    from megatron_ling.training.sft import thd_available
    from megatron_ling.training.trainer import preflight, setup

    os.environ.setdefault("LING_CPU_THREADS", os.environ.get("BENCH_THREADS", "2"))
    work = tempfile.mkdtemp(prefix="bench_sft")
    tok = S.make_chat_tokenizer(os.path.join(work, "tok"))
    S.write_conversations(os.path.join(work, "c.jsonl"), a.convs, seed=3)
    prefix = preprocess_chat([os.path.join(work, "c.jsonl")], os.path.join(work, "c"), tok, a.seq,
                             progress=False).prefix
    rows = []
    for packing in (False, True):
        recipe = sft_recipe(work, prefix, tok, packing, a.steps + 1, a.seq, a.mbs)
        _, data_cfg, tokenizer = preflight(recipe, 1)
        n = (a.steps + 1) * a.mbs  # the samples this run reads (the trainer's own dataset, same seed)
        pad = build_chat_datasets(data_cfg, tokenizer, a.seq, (n, None, None))[0].padding_fraction()
        s = setup(recipe)
        s.step(s.next_microbatches())  # warm-up
        t0, toks = time.perf_counter(), 0
        for _ in range(a.steps):
            toks += s.step(s.next_microbatches()).num_tokens
        dt = time.perf_counter() - t0
        rows.append((packing, pad, a.steps * a.mbs * a.seq / dt, toks / dt))
        del s
    print(f"\nling-tiny, seq {a.seq}, micro-batch {a.mbs}, {a.steps} timed steps (+1 warm-up), "
          f"{'THD/TE' if thd_available() else 'CPU mask'} path, {torch.get_num_threads()} threads")
    print(f"| {'packing':8s} | {'padding':>8s} | {'positions/s':>12s} | {'assistant tok/s':>16s} |")
    print(f"|{'-' * 10}|{'-' * 10}|{'-' * 14}|{'-' * 18}|")
    for packing, pad, pos_s, tok_s in rows:
        print(f"| {str(packing):8s} | {pad:8.3f} | {pos_s:12.0f} | {tok_s:16.0f} |")


if __name__ == "__main__":
    main()
