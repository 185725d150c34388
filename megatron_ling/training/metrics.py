"""Per-interval console line, tensorboard scalars and a metrics.jsonl file (rank 0 writes)."""
from __future__ import annotations

import json
import os
import resource
import time
from typing import Optional

import torch


def memory_gib() -> dict:
    if torch.cuda.is_available():
        return {"mem_allocated_gib": torch.cuda.memory_allocated() / 2**30,
                "mem_max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}
    return {"mem_max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def gather_moe_stats(stats) -> dict:
    """Per-layer max/mean expert load and expert-bias spread from every pipeline stage (collective
    over the pipeline group; the first TP/DP rank of each stage contributes)."""
    from megatron.core import parallel_state as ps

    local = {}
    imb, spread = stats.imbalance(), stats.bias_spread()
    if imb is not None:
        for name, a, b in zip(stats.layer_ids, imb.tolist(), spread.tolist()):
            local[name] = (a, b)
    gathered = [None] * ps.get_pipeline_model_parallel_world_size()
    torch.distributed.all_gather_object(gathered, local, group=ps.get_pipeline_model_parallel_group())
    merged = {}
    for g in gathered:
        merged.update(g or {})
    return merged


class MetricsLogger:
    def __init__(self, rank: int, tensorboard_dir: Optional[str], metrics_file: Optional[str], train_iters: int):
        self.rank = rank
        self.train_iters = train_iters
        self.writer = None
        self.metrics_file = metrics_file if rank == 0 else None
        if rank == 0 and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(tensorboard_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        if self.metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(self.metrics_file)), exist_ok=True)
        self._t = time.time()

    def log(self, iteration: int, scalars: dict, moe: Optional[dict] = None) -> None:
        if self.rank != 0:
            return
        parts = [f"iter {iteration}/{self.train_iters}"]
        for k in ("lm_loss", "mtp_1_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"):
            if k in scalars and scalars[k] is not None:
                v = scalars[k]
                parts.append(f"{k.replace('_', ' ')} {v:.3e}" if k in ("lr", "z_loss") else f"{k.replace('_', ' ')} {v:.4f}"
                             if isinstance(v, float) else f"{k} {v}")
        if scalars.get("tflops_per_gpu") is not None:  # Megatron-LM's "throughput per GPU"
            parts.append(f"TFLOP/s/GPU {scalars['tflops_per_gpu']:.3g}")
        if scalars.get("mfu") is not None:
            parts.append(f"MFU {100 * scalars['mfu']:.2f}%")
        if moe:
            worst = max(v[0] for v in moe.values())
            parts.append(f"max expert load/mean {worst:.2f}")
        print(" | ".join(parts), flush=True)
        record = {"iteration": iteration, **{k: v for k, v in scalars.items() if v is not None}}
        if moe:
            record["moe_load_imbalance"] = {k: v[0] for k, v in moe.items()}
            record["expert_bias_spread"] = {k: v[1] for k, v in moe.items()}
        if self.writer is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)) and v is not None:
                    self.writer.add_scalar(f"train/{k}", v, iteration)
            for k, (imb, spread) in (moe or {}).items():
                self.writer.add_scalar(f"moe/load_imbalance/{k}", imb, iteration)
                self.writer.add_scalar(f"moe/expert_bias_spread/{k}", spread, iteration)
            self.writer.flush()
        if self.metrics_file:
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")

    def close(self):
        if self.writer is not None:
            self.writer.close()
