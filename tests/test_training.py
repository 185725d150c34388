"""ling-train end to end: a real 2-process torchrun (gloo) run, exact resume, recipe errors."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_ling.checkpoint.layout import TRACKER, latest_iteration, read_common_state
from megatron_ling.checkpoint.layout import iteration_dir as checkpoint_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["training.train_iters=12", "training.seq_length=64", "training.micro_batch_size=4",
         "training.global_batch_size=8", "lr.warmup_iters=2", "checkpoint.interval=6", "logging.log_interval=1"]


def _train(run_dir, *overrides, timeout=600):
    cmd = [sys.executable, "-m", "megatron_ling.training.cli", "--nproc-per-node", "2", "--config", "quickstart",
           f"run_dir={run_dir}", *SMALL, *overrides]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _losses(run_dir):
    return {d["iteration"]: d for d in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl")))}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("train") / "run")
    p = _train(run)
    return run, p.stdout


@pytest.mark.slow
def test_two_process_training_loss_falls_and_leaves_outputs(reference_run):
    run, stdout = reference_run
    m = _losses(run)
    assert sorted(m) == list(range(1, 13))
    assert m[12]["lm_loss"] < m[1]["lm_loss"] - 0.3, (m[1]["lm_loss"], m[12]["lm_loss"])
    for k in ("mtp_1_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "moe_load_imbalance", "expert_bias_spread"):
        assert k in m[12], k
    assert set(m[12]["moe_load_imbalance"]) == {"layer2", "layer3", "layer4", "layer5"}  # 3 MoE layers + MTP
    assert "iter 12/12 | lm loss" in stdout and "checkpoint:" in stdout
    ckpt = os.path.join(run, "checkpoints")
    assert latest_iteration(ckpt) == 12 and os.path.isdir(checkpoint_path(ckpt, 6))
    common = read_common_state(ckpt)
    assert common["iteration"] == 12 and common["ling_config"]["num_experts"] == 8
    assert common["recipe"]["parallel"]["tp"] == 2 and common["consumed_samples"] == 12 * 8
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(run, "tensorboard")))


@pytest.mark.slow
def test_resume_continues_the_exact_trajectory(reference_run, tmp_path):
    run, _ = reference_run
    ref = _losses(run)
    # the job "died" after the iteration-6 checkpoint: keep only that one
    resumed = str(tmp_path / "resumed")
    os.makedirs(os.path.join(resumed, "checkpoints"))
    shutil.copytree(checkpoint_path(os.path.join(run, "checkpoints"), 6), checkpoint_path(os.path.join(resumed, "checkpoints"), 6))
    with open(os.path.join(resumed, "checkpoints", TRACKER), "w") as f:
        f.write("6")
    p = _train(resumed)
    assert "starting at iteration 6" in p.stdout
    got = _losses(resumed)
    assert sorted(got) == list(range(7, 13))
    for it in range(7, 13):  # CPU fp32: bit-identical
        assert got[it]["lm_loss"] == ref[it]["lm_loss"], (it, got[it]["lm_loss"], ref[it]["lm_loss"])
        assert got[it]["grad_norm"] == ref[it]["grad_norm"]
        assert got[it]["mtp_1_loss"] == ref[it]["mtp_1_loss"]


BAD = [
    (["model.overrides.num_key_value_heads=3"], 2, "model.num_key_value_heads"),
    (["parallel.ep=16", "parallel.etp=1"], 16, "parallel.ep: num_experts=8 is not divisible by ep=16"),
    (["parallel.tp=3", "parallel.ep=1", "parallel.etp=null"], 3, "parallel.tp: tp=3 does not divide num_attention_heads"),
    (["parallel.tp=2", "parallel.pp=2"], 2, "parallel.tp: world size 2 is not divisible by tp*pp*cp"),
    (["training.global_batch_size=12"], 2, "training.global_batch_size: 12 is not divisible"),
    (["model.preset=ling-2t"], 2, "model.preset: unknown preset"),
    (["data.paths=[/nonexistent/corpus_text_document]"], 2, "data.paths"),
    (["parallel.tp=1", "parallel.ep=1", "parallel.pp=2", "parallel.pipeline_layout=Et|tmL"], 2,
     "parallel.pipeline_layout: 'Et|tmL' places 2 decoder layers but the model has 4"),
    (["parallel.tp=1", "parallel.ep=1", "parallel.pp=2", "parallel.vpp=2", "parallel.pipeline_layout=Ett|tt|m|L"], 2,
     "parallel.pipeline_layout: with vpp=2, MTP must not be on pipeline rank 0"),
    (["parallel.tp=2", "parallel.ep=1", "parallel.etp=1"], 2, "parallel.etp: tp=2 with ep=1 and etp=1"),
    (["parallel.tp=2", "parallel.ep=2", "parallel.etp=null", "parallel.sp=false"], 4, "parallel.sp: MoE training with tp=2"),
    (["parallel.tp=1", "parallel.ep=1", "parallel.pp=2", "parallel.vpp=2",
      "parallel.num_layers_in_first_pipeline_stage=1", "parallel.num_layers_in_last_pipeline_stage=1"], 2,
     "parallel.pipeline_layout: with pp=2 and vpp>1"),
    (["training.foo=1"], 2, "recipe.training.foo: unknown field"),
    (["training.train_iters=many"], 2, "recipe.training.train_iters: expected an integer"),
    (["model.overrides.vocab_size=100"], 2, "model.overrides.vocab_size: the tokenizer has"),
    (["training.seq_length=4096"], 2, "training.seq_length: 4096 exceeds"),
    (["lr.warmup_iters=1000"], 2, "lr.warmup_iters"),
    (["parallel.cp=2", "parallel.tp=1", "parallel.ep=1"], 2, "parallel.cp: context parallelism needs Transformer Engine"),
]


@pytest.fixture(scope="module")
def quickstart_data():
    """Build the quick-start corpus/tokenizer first (it prints progress), so that the error cases
    below see only their own output."""
    from megatron_ling.data.config import DataConfig
    from megatron_ling.data.datasets import resolve_data_config

    return resolve_data_config(DataConfig())


@pytest.mark.parametrize("overrides,nproc,expect", BAD, ids=[b[2].split(":")[0] + f"-{i}" for i, b in enumerate(BAD)])
def test_bad_recipe_is_one_line_before_any_process_group(overrides, nproc, expect, capsys, tmp_path,
                                                          quickstart_data):
    from megatron_ling.training.cli import main

    rc = main(["--nproc-per-node", str(nproc), "--config", "quickstart", f"run_dir={tmp_path}/run", *overrides])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and expect in err, err
    assert not torch.distributed.is_initialized()
    assert not os.path.exists(f"{tmp_path}/run")  # nothing written


def test_missing_recipe_file(capsys):
    from megatron_ling.training.cli import main

    assert main(["--config", "/nonexistent/recipe.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "error: --config: /nonexistent/recipe.yaml not found; check the path"


def test_lr_schedules():
    """wsm = warmup then constant (Ling); cosine/wsd decay — through Megatron's scheduler."""
    from megatron_ling.training.recipe import LRConfig, OptimizerSection
    from megatron_ling.training.setup import build_lr_scheduler

    class _Opt:  # OptimizerParamScheduler only reads/writes param_groups
        param_groups = [{"lr": 0.0, "weight_decay": 0.0}]

    def lrs(cfg, n=100):
        s = build_lr_scheduler(_Opt(), cfg, OptimizerSection(lr=1.0, min_lr=0.1), n)
        out = []
        for _ in range(n):
            s.step(1)
            out.append(_Opt.param_groups[0]["lr"])
        return out

    w = lrs(LRConfig(schedule="wsm", warmup_iters=10))
    assert w[4] == pytest.approx(0.5) and all(x == pytest.approx(1.0) for x in w[10:])
    c = lrs(LRConfig(schedule="cosine", warmup_iters=10))
    assert c[50] < 0.8 and c[-1] == pytest.approx(0.1, abs=1e-3)
    d = lrs(LRConfig(schedule="wsd", warmup_iters=10, wsd_decay_iters=20, wsd_decay_style="linear"))
    assert d[70] == pytest.approx(1.0) and d[-1] == pytest.approx(0.1, abs=0.05)


@pytest.mark.parametrize("world,parallel", [(1, dict(distributed_optimizer=False)),
                                            (2, dict(pp=2, pipeline_layout="Et|tttmL"))], ids=["1rank", "pp2"])
def test_logged_mtp_loss_matches_the_loss_of_the_mtp_logits(world, parallel):
    """The logged MTP loss is the cross entropy of the MTP head's logits against the labels one
    position further on (recomputed here, not read from megatron-core's tracker). On megatron-core
    0.19 reading 0.16.1's tracker key logged 0.0000 while MTP trained."""
    from tests.support import fidelity as F
    from tests.support.harness import run_ranks

    out = run_ranks(F.mtp_loss_check, world, dict(recipe=F.case(steps=1), parallel=parallel),
                    timeout_s=120, grace_s=3)
    recomputed = [o["recomputed"] for o in out if o["recomputed"] is not None]
    assert len(recomputed) == 1, out  # exactly one stage holds the output layer
    for o in out:  # every rank logs the same value
        assert o["logged"] == pytest.approx(recomputed[0], rel=1e-5), (o["logged"], recomputed[0])
    assert all(v > 1.0 for v in recomputed[0])  # ~ln(vocab) at initialisation: not a zero metric
