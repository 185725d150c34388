"""The WSM claim on this machine: merging the last checkpoints of a constant-LR run emulates the
LR decay (FACTS §5, arXiv 2507.17634).

    python bench/wsm.py [--shapes linear 1-sqrt] [--lr 1e-2] [--iters 150] [--interval 10] [--window 40]
                        [--out /tmp/wsm-bench] [--force]

1. constant: ``ling-train --nproc-per-node 2 --config quickstart`` with ``lr.schedule=wsm`` (warmup,
   then constant LR), a checkpoint every ``--interval`` iterations.
2. decay: the same run (same seed, same batches: identical up to the decay) with ``lr.schedule=wsd``,
   decaying to 0 over the last ``--window`` iterations, for each of ``--shapes`` (linear; 1-sqrt is
   megatron's ``minus_sqrt``). Default: linear only (a few minutes); both take ~10 min here.
3. ``ling-merge`` of the constant run's checkpoints in that window (window/interval + 1 of them)
   with the matching shape (linear = the uniform mean), and an EMA for reference.
4. Held-out loss (the quick-start corpus' validation split, never trained on) of every model, in
   one process at TP1 (megatron-core loads the TP2 x EP2 checkpoints at TP1).

Prints a table; docs/merge.md records the numbers with the date. Claim, per shape: merged <=
decayed + TOL and merged < last constant checkpoint; exit status 1 if it fails for a shape.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("PYTHONWARNINGS", "ignore")
TOL = 0.02  # nats: "no worse than the decayed run" within this


def train(run_dir, iters, interval, *overrides):
    cmd = [sys.executable, "-m", "megatron_ling.training.cli", "--nproc-per-node", "2", "--config", "quickstart",
           f"run_dir={run_dir}", f"training.train_iters={iters}", f"checkpoint.interval={interval}",
           f"logging.log_interval={max(iters // 5, 1)}", *overrides]
    t = time.time()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    if p.returncode:
        sys.exit(f"training failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    print(f"  trained {run_dir} in {time.time() - t:.0f} s", flush=True)
    return os.path.join(run_dir, "checkpoints")


def heldout_losses(paths: dict, n_samples: int, seq_length: int) -> dict:
    """Mean token loss of each checkpoint on the first ``n_samples`` validation sequences."""
    import torch

    from megatron_ling.convert.verify import load_megatron_model, single_process_megatron
    from megatron_ling.data.datasets import build_datasets, resolve_data_config
    from megatron_ling.data.tokenizer import load_tokenizer
    from megatron_ling.training.recipe import load_recipe

    out = {}
    with single_process_megatron():
        data = resolve_data_config(load_recipe("quickstart").data)
        tok = load_tokenizer(data.tokenizer, data.cache_dir)
        _, valid, _ = build_datasets(data, tok, seq_length, (1, n_samples, None))
        samples = [valid[i] for i in range(n_samples)]
        for name, path in paths.items():
            _, model = load_megatron_model(path)
            tot = cnt = 0.0
            with torch.no_grad():
                for i in range(0, n_samples, 8):
                    b = samples[i:i + 8]
                    tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in b])
                    labels = torch.stack([torch.as_tensor(s["labels"]) for s in b])
                    mask = torch.stack([torch.as_tensor(s["loss_mask"]) for s in b]).float()
                    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
                    loss = model(tokens, pos, attention_mask=None, labels=labels).float()
                    tot += float((loss * mask).sum())
                    cnt += float(mask.sum())
            out[name] = tot / cnt
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=150)
    ap.add_argument("--interval", type=int, default=10)
    ap.add_argument("--window", type=int, default=40, help="decay / merge window, a multiple of --interval")
    ap.add_argument("--lr", type=float, default=1e-2, help="peak LR (the quick-start recipe has 3e-3)")
    ap.add_argument("--shapes", nargs="+", default=["linear"], choices=["linear", "1-sqrt"])
    ap.add_argument("--eval-samples", type=int, default=64)
    ap.add_argument("--out", default="/tmp/wsm-bench")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    if a.window % a.interval or a.window >= a.iters:
        sys.exit("error: --window must be a multiple of --interval and shorter than --iters")
    if os.path.exists(a.out):
        if not a.force:
            sys.exit(f"error: --out {a.out} exists; pass --force to replace it")
        shutil.rmtree(a.out)
    os.makedirs(a.out)
    from megatron_ling.merge.cli import main as merge_main

    t0 = time.time()
    lr = [f"optimizer.lr={a.lr}"]
    styles = {"linear": "linear", "1-sqrt": "minus_sqrt"}
    const = train(os.path.join(a.out, "constant"), a.iters, a.interval, "lr.schedule=wsm", *lr)
    dec = {}
    for shape in a.shapes:
        dec[shape] = train(os.path.join(a.out, f"decay_{shape}"), a.iters, a.iters, "lr.schedule=wsd",
                           f"lr.wsd_decay_iters={a.window}", f"lr.wsd_decay_style={styles[shape]}", *lr)
    k1 = a.window // a.interval + 1
    merged = {}
    for shape in (*a.shapes, "ema"):
        merged[shape] = os.path.join(a.out, f"merged_{shape}")
        assert merge_main([const, "--last", str(k1), "--shape", shape, "--out", merged[shape], "--no-progress"]) == 0
    from megatron_ling.training.recipe import load_recipe

    seq = load_recipe("quickstart").training.seq_length
    paths = {"constant LR, last checkpoint": const}
    for shape in a.shapes:
        paths[f"decay {shape} (wsd {styles[shape]})"] = dec[shape]
        paths[f"merge {shape} of last {k1}"] = merged[shape]
    paths[f"merge ema 0.9 of last {k1}"] = merged["ema"]
    losses = heldout_losses(paths, a.eval_samples, seq)
    print(f"\nWSM on the quick-start model: peak LR {a.lr:g}, {a.iters} iterations, checkpoints every {a.interval}, window "
          f"{a.window} ({k1} checkpoints), held-out loss on {a.eval_samples} x {seq} tokens "
          f"({time.strftime('%Y-%m-%d')}, {time.time() - t0:.0f} s)\n")
    print(f"| {'model':<34} | held-out loss |")
    print(f"|{'-' * 36}|---------------|")
    for k, v in losses.items():
        print(f"| {k:<34} | {v:13.4f} |")
    c = losses["constant LR, last checkpoint"]
    ok = True
    for shape in a.shapes:
        m, d = losses[f"merge {shape} of last {k1}"], losses[f"decay {shape} (wsd {styles[shape]})"]
        holds = m <= d + TOL and m < c
        ok &= holds
        print(f"claim {shape} (merge <= decay + {TOL} and merge < constant): {'holds' if holds else 'FAILS'} "
              f"(merge - decay = {m - d:+.4f}, merge - constant = {m - c:+.4f})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
