"""Real measurements on this machine: per-unit calibration and profiled pipeline runs.

* ``calibrate(...)`` times each scheduling unit type (E, D, M, MTP_T, MTP_L, L) by running the
  real Megatron-Core modules of a Ling model (built with ``build_ling_model``) forward and backward
  in one process, and returns a ``Calibration`` the cost model can use.
* ``measure_layouts(...)`` runs real multi-rank gloo training steps (megatron-core's own
  ``get_forward_backward_func``) for one or more pipeline layouts under the bubble profiler, in
  forked local processes (CPU; the same code path the trainer uses on GPUs), and returns the
  measured iteration time of each layout; the per-rank profiles land in ``out_dir/<i>/bubbles``.

Both are CPU tools for small presets: they are how the tests check the simulator and planner
against reality, and how ``ling-plan calibrate`` / ``ling-plan measure`` work.
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from megatron_ling import compat
from megatron_ling.data.random_batches import random_microbatch
from megatron_ling.local_launch import run_local
from megatron_ling.models.config import LingConfig
from megatron_ling.pipeline.costmodel import Calibration, CostModel, CostOptions


def make_microbatches(ling: LingConfig, num: int, seq_length: int, micro_batch_size: int, seed: int = 0) -> list:
    return [random_microbatch(seed * 1000 + i, micro_batch_size, seq_length, ling.vocab_size) for i in range(num)]


def renice(niceness: Optional[int]) -> None:
    """Best effort: change this process's scheduling priority (negative = higher; needs the
    privilege). Timing runs on a machine shared with other jobs use it so that their own ranks,
    not the neighbours, get the cores while they measure."""
    if niceness:
        try:
            os.nice(niceness)
        except OSError:
            pass


# --------------------------------------------------------------------------- calibration
def calibrate(ling: LingConfig, seq_length: int, micro_batch_size: int, reps: int = 5,
              threads: int = 1) -> Calibration:
    """Measure forward and backward seconds of every unit type with the real modules.

    E: embedding lookup; D / M: one dense / MoE TransformerLayer (with RoPE); MTP_T: the MTP
    layer's norms, eh_proj and MoE transformer layer, plus its embedding of the shifted tokens;
    L and MTP_L: output layer + cross entropy (the same computation). Backward is timed as
    forward+backward minus forward; each is the fastest of ``reps`` round-robin runs.
    """
    from megatron.core import parallel_state as ps

    from megatron_ling.models.builder import build_ling_model
    from megatron_ling.models.megatron_config import to_transformer_config
    from megatron_ling.parallel.config import ParallelConfig
    from megatron_ling.training.setup import init_model_parallel, init_single_process

    init_single_process(cpu_threads=1)
    torch.set_num_threads(threads)
    init_model_parallel(ParallelConfig(), ling)
    tf = to_transformer_config(ling, ParallelConfig())
    model = build_ling_model(ling, tf, pre_process=True, post_process=True, max_sequence_length=seq_length)
    mb = make_microbatches(ling, 1, seq_length, micro_batch_size)[0]
    tokens, pos, labels = mb["tokens"], mb["position_ids"], mb["labels"]
    h = ling.hidden_size
    rope = model.rotary_pos_emb(seq_length)
    if model.position_embedding_type == "yarn":  # (emb, mscale): attention reads mscale from the config
        rope = rope[0]  # as GPTModel.forward does (megatron-core gpt_model.py:375)
    x0 = torch.randn(seq_length, micro_batch_size, h) * 0.1

    def layer_fn(layer):
        def run(backward):
            x = x0.clone().requires_grad_(backward)
            out = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)
            out = out[0] if isinstance(out, tuple) else out
            if backward:
                out.backward(torch.ones_like(out))
        return run

    def emb_fn(backward):
        out = model.embedding(input_ids=tokens, position_ids=pos)
        if backward:
            out.backward(torch.ones_like(out))

    def loss_fn(backward):
        x = x0.clone().requires_grad_(backward)
        logits, _ = model.output_layer(x)
        loss = model.compute_language_model_loss(labels, logits)
        if backward:
            loss.sum().backward()

    units = {"E": emb_fn, "L": loss_fn}
    layers = list(model.decoder.layers)
    if ling.first_k_dense_replace > 0:
        units["D"] = layer_fn(layers[0])
    if ling.num_moe_layers > 0:
        units["M"] = layer_fn(layers[ling.first_k_dense_replace])
    if ling.num_nextn_predict_layers and model.mtp is not None:
        mtp = model.mtp.layers[0]

        def mtp_fn(backward):
            x = x0.clone().requires_grad_(backward)
            e = model.embedding(input_ids=tokens, position_ids=pos)
            hid = mtp.eh_proj(torch.cat([mtp.enorm(e), mtp.hnorm(x)], dim=-1))[0]
            out = compat.mtp_inner_layer(mtp)(hidden_states=hid, attention_mask=None, rotary_pos_emb=rope)
            out = out[0] if isinstance(out, tuple) else out
            out = mtp.final_layernorm(out)
            if backward:
                out.backward(torch.ones_like(out))
        units["MTP_T"] = mtp_fn

    cost = CostModel(ling, CostOptions(seq_length=seq_length, micro_batch_size=micro_batch_size))
    # Round-robin over the units, keeping each one's fastest run: on a shared machine a load spike
    # then hits one sample of every unit rather than all samples of one unit.
    fwd = {k: [] for k in units}
    fwdbwd = {k: [] for k in units}
    for rep in range(reps + 1):
        for kind, fn in units.items():
            t = time.perf_counter()
            with torch.no_grad():
                fn(False)
            t1 = time.perf_counter()
            fn(True)
            t2 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            if rep:  # the first round warms up allocators and caches
                fwd[kind].append(t1 - t)
                fwdbwd[kind].append(t2 - t1)
    result = {}
    for kind in units:
        f, fb = min(fwd[kind]), min(fwdbwd[kind])
        u = cost.unit(kind)
        result[kind] = {"fwd_s": f, "bwd_s": max(fb - f, 0.0), "fwd_flops": u.fwd_flops, "bwd_flops": u.bwd_flops}
    if "L" in result:
        result["MTP_L"] = dict(result["L"], fwd_flops=cost.unit("MTP_L").fwd_flops,
                               bwd_flops=cost.unit("MTP_L").bwd_flops)
    ps.destroy_model_parallel()
    meta = {"seq_length": seq_length, "micro_batch_size": micro_batch_size, "threads": threads,
            "host": socket.gethostname(), "device": "cpu", "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return Calibration(units=result, p2p_latency_s=0.0, meta=meta)


def _calibrate_worker(rank: int, world: int, port: int, ling_d: dict, seq_length: int, micro_batch_size: int,
                      reps: int, threads: int, out_path: str, niceness: Optional[int] = None):
    from megatron_ling.training.setup import shutdown_distributed

    renice(niceness)
    try:
        ling = LingConfig.from_hf_dict(ling_d)
        cal = calibrate(ling, seq_length, micro_batch_size, reps=reps, threads=threads)
        cal.meta["model"] = ling_d
        cal.save(out_path, force=True)
    finally:
        shutdown_distributed()


def calibrate_local(ling: LingConfig, seq_length: int, micro_batch_size: int, out_path: str, reps: int = 5,
                    threads: int = 1, timeout_s: float = 300.0, niceness: Optional[int] = None) -> Calibration:
    """``calibrate`` in a forked child process (keeps this process free of a process group)."""
    run_local(_calibrate_worker, 1, (ling.to_hf_dict(), seq_length, micro_batch_size, reps, threads, out_path,
                                        niceness), timeout_s=timeout_s)
    return Calibration.load(out_path)


# ------------------------------------------------------------------------ layout runs
@dataclass
class MeasureSpec:
    ling: dict  # LingConfig as HF dict
    pp: int
    layouts: list
    seq_length: int
    micro_batch_size: int
    num_microbatches: int
    steps: int = 3  # profiled steps per layout (after one warm-up step)
    out_dir: str = ""
    threads: int = 1
    niceness: Optional[int] = None


def layout_recipe(spec: MeasureSpec, i: int, model_config: str):
    """The training recipe of layout ``i``: mock data, no checkpoints, the bubble profiler on every
    step after the first (a warm-up), profiles in ``out_dir/<i>/bubbles``."""
    from megatron_ling.parallel.layout import expand
    from megatron_ling.training.recipe import recipe_from_dict

    layout = spec.layouts[i]
    vpp = len(expand(layout)) // spec.pp
    return recipe_from_dict(dict(
        run_dir=os.path.join(spec.out_dir, str(i)), model=dict(preset=None, hf_config=model_config),
        parallel=dict(pp=spec.pp, vpp=vpp if vpp > 1 else None, pipeline_layout=layout),
        training=dict(train_iters=1 + spec.steps, micro_batch_size=spec.micro_batch_size,
                      global_batch_size=spec.micro_batch_size * spec.num_microbatches, seq_length=spec.seq_length),
        data=dict(mock=True), checkpoint=dict(resume="none", save=False),
        profiling=dict(enabled=True, steps=list(range(2, 2 + spec.steps)))))


def _measure_worker(rank: int, world: int, port: int, spec_d: dict, model_config: str):
    from megatron.core import parallel_state as ps

    from megatron_ling.parallel.layout import embedding_pp_ranks, expand
    from megatron_ling.training.setup import shutdown_distributed
    from megatron_ling.training.trainer import pipeline_profiler, setup

    spec = MeasureSpec(**spec_d)
    renice(spec.niceness)
    os.environ["LING_CPU_THREADS"] = str(spec.threads)
    ling = LingConfig.from_hf_dict(spec.ling)
    try:
        groups: dict = {}
        for i, layout in enumerate(spec.layouts):
            # megatron's parallel state depends on the VPP size and on which stages share the word
            # embedding (a standalone MTP stage does; see parallel/layout.embedding_pp_ranks)
            key = (len(expand(layout)) // spec.pp, tuple(embedding_pp_ranks(layout, spec.pp, ling.tie_word_embeddings)))
            groups.setdefault(key, []).append(i)
        for items in groups.values():
            # Layouts that share megatron's parallel state are set up together and stepped round-robin
            # (each on the same batches): load drift on a shared machine then hits every layout alike
            # instead of whichever happened to run during it.
            sessions = [setup(layout_recipe(spec, i, model_config)) for i in items]
            mbs = sessions[0].next_microbatches()
            runs = [(s, pipeline_profiler(s)) for s in sessions]
            for it in range(1, 2 + spec.steps):
                for s, prof in runs:
                    with prof.step(it, s.bundle.chunks):
                        s.step(mbs)
            del runs, sessions
            torch.distributed.barrier()
            ps.destroy_model_parallel()
    finally:
        shutdown_distributed()


def measure_layouts(ling: LingConfig, pp: int, layouts: list, seq_length: int, micro_batch_size: int,
                    num_microbatches: int, out_dir: str, steps: int = 3, threads: int = 1,
                    timeout_s: float = 300.0, niceness: Optional[int] = None) -> list:
    """Run every layout for real on ``pp`` local ranks; returns, per layout, a dict with the
    layout, its run directory and the fastest / median measured iteration time (pipeline span)."""
    from megatron_ling.parallel.layout import check_layout
    from megatron_ling.pipeline.profile import load_run

    for lay in layouts:
        check_layout(lay, pp, ling.num_hidden_layers, ling.num_nextn_predict_layers)
    os.makedirs(out_dir, exist_ok=True)
    model_config = os.path.join(out_dir, "config.json")  # the model every layout's recipe builds
    with open(model_config + ".tmp", "w") as f:
        json.dump(ling.to_hf_dict(), f, indent=2)
    os.replace(model_config + ".tmp", model_config)
    spec = MeasureSpec(ling=ling.to_hf_dict(), pp=pp, layouts=list(layouts), seq_length=seq_length,
                       micro_batch_size=micro_batch_size, num_microbatches=num_microbatches, steps=steps,
                       out_dir=out_dir, threads=threads, niceness=niceness)
    run_local(_measure_worker, pp, (asdict(spec), model_config), timeout_s=timeout_s)
    res = []
    for i, lay in enumerate(layouts):
        run = load_run(os.path.join(out_dir, str(i)))
        spans = [tl.span for tl in run.timelines]
        # the fastest recorded iteration: on a shared machine, the least disturbed one
        res.append({"layout": lay, "run_dir": os.path.join(out_dir, str(i)), "iteration_s": min(spans),
                    "median_s": statistics.median(spans), "iterations_s": spans})
    return res
