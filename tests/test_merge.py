"""ling-merge (WSM): coefficients, exact merging across parallel layouts, refusals, and a merged
checkpoint that ling-train resumes and ling-convert exports."""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.support.synthetic import save_megatron_checkpoint
from tests.support.trees import assert_identical
from megatron_ling.convert.torch_dist import TorchDistReader
from megatron_ling.errors import LingConfigError
from megatron_ling.merge.cli import main as merge_main
from megatron_ling.merge.coefficients import SHAPES, merge_coefficients, update_weights
from megatron_ling.merge.merge import merge, plan_merge
from megatron_ling.models.config import get_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = get_preset("ling-tiny", initializer_range=0.1)


# ---------------------------------------------------------------------------------- coefficients
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("iterations", [[100], [100, 200], [10, 20, 30, 40, 50, 60, 70, 80], [5, 6, 9, 20]])
def test_coefficients_are_a_convex_combination_with_the_stated_update_weights(shape, iterations):
    n = len(iterations)
    weights = [float(i + 1) for i in range(n)] if shape == "weights" else None
    c = merge_coefficients(shape, iterations, weights=weights)
    assert len(c) == n and all(x >= 0 for x in c)
    assert sum(c) == pytest.approx(1.0, abs=1e-12)
    w = update_weights(c)
    assert len(w) == n - 1
    for i in range(1, n):
        assert w[i - 1] == pytest.approx(sum(c[i:]), abs=1e-12)
    if shape in ("linear", "cosine", "1-sqrt", "exponential", "mean"):  # decays: 1 >= w_1 >= ... >= w_k >= 0
        assert all(1 + 1e-12 >= a >= b - 1e-12 for a, b in zip([1.0] + w, w + [0.0]))
    if n == 1:
        assert c == [1.0]


def test_coefficients_follow_the_papers_rule():
    its = [10, 20, 30, 40]  # k = 3, t_i = i/4
    t = [0.25, 0.5, 0.75]
    for shape, f in (("linear", lambda x: 1 - x), ("cosine", lambda x: (1 + math.cos(math.pi * x)) / 2),
                     ("1-sqrt", lambda x: 1 - math.sqrt(x)), ("exponential", lambda x: math.exp(-5 * x))):
        w = [f(x) for x in t]
        want = [1 - w[0], w[0] - w[1], w[1] - w[2], w[2]]
        assert merge_coefficients(shape, its) == pytest.approx(want, abs=1e-15), shape
    # a uniform mean of k+1 checkpoints is the linear decay (FACTS §5)
    assert merge_coefficients("linear", its) == pytest.approx([0.25] * 4, abs=1e-15)
    assert merge_coefficients("mean", its) == [0.25] * 4
    a = 0.8
    assert merge_coefficients("ema", its, ema_decay=a) == pytest.approx([a ** 3, (1 - a) * a ** 2, (1 - a) * a, 1 - a])
    assert merge_coefficients("weights", its, weights=[1, 1, 0, 2]) == [0.25, 0.25, 0.0, 0.5]


@pytest.mark.parametrize("kw,msg", [
    (dict(shape="step"), "--shape: must be one of"),
    (dict(shape="weights"), "--weights: --shape weights needs"),
    (dict(shape="weights", weights=[1, 2]), "--weights: 2 weights for 3 checkpoints"),
    (dict(shape="weights", weights=[1, -1, 1]), "--weights: weights must be finite, >= 0"),
    (dict(shape="linear", weights=[1, 1, 1]), "--weights: only used with --shape weights"),
    (dict(shape="ema", ema_decay=1.0), "--ema-decay"),
    (dict(shape="exponential", exp_rate=0.0), "--exp-rate"),
])
def test_bad_coefficient_options(kw, msg):
    with pytest.raises(LingConfigError, match="^" + msg.replace("(", r"\(")):
        merge_coefficients(iterations=[1, 2, 3], **kw)


# ------------------------------------------------------------------- checkpoints at two layouts
@pytest.fixture(scope="module")
def two_layouts(tmp_path_factory):
    """One model family saved by megatron-core at TP2 (iteration 10) and at EP2 (iteration 20)."""
    root = str(tmp_path_factory.mktemp("merge") / "run")
    save_megatron_checkpoint(CFG, root, dict(tp=2), 2, iteration=10, seed=1)
    save_megatron_checkpoint(CFG, root, dict(ep=2), 2, iteration=20, seed=2)
    return root


def _tensors(path):
    r = TorchDistReader(path)
    return {k: r.read(k) for k in r.tensors}


def test_merge_of_two_layouts_is_exactly_the_fp32_combination(two_layouts, tmp_path):
    out = str(tmp_path / "merged")
    assert merge_main([two_layouts, "--last", "2", "--shape", "weights", "--weights", "0.3", "0.7",
                       "--out", out, "--no-progress"]) == 0
    a, b = _tensors(os.path.join(two_layouts, "iter_0000010")), _tensors(os.path.join(two_layouts, "iter_0000020"))
    m = _tensors(out)
    assert set(m) == set(a) and len(m) > 20
    c0, c1 = 0.3 / 1.0, 0.7 / 1.0
    for k in m:
        want = a[k].float() * c0 + b[k].float() * c1
        assert m[k].dtype == a[k].dtype and torch.equal(m[k], want.to(a[k].dtype)), k
    assert any(k.endswith("expert_bias") for k in m)  # merged with the same coefficients by default
    common = TorchDistReader(out).common_state()
    assert common["iteration"] == 20 and common["model_only"] is True
    assert common["merged_from"]["iterations"] == [10, 20]
    assert common["merged_from"]["coefficients"] == pytest.approx([0.3, 0.7])
    assert open(os.path.join(out, "latest_checkpointed_iteration.txt")).read() == "20"
    # the objects megatron saved (_extra_state) are carried, so a strict megatron load finds them
    assert set(TorchDistReader(out).objects) == set(TorchDistReader(os.path.join(two_layouts, "iter_0000020")).objects)


def test_merge_workers_write_the_same_tensors_with_a_checksum_manifest(two_layouts, tmp_path, capsys):
    from megatron_ling.checkpoint import manifest

    one, two = str(tmp_path / "w1"), str(tmp_path / "w2")
    args = [two_layouts, "--last", "2", "--shape", "mean", "--no-progress", "--file-size", "20KB"]
    assert merge_main(args + ["--out", one]) == 0
    assert merge_main(args + ["--out", two, "--workers", "2"]) == 0
    d1, d2 = os.path.join(one, "iter_0000020"), os.path.join(two, "iter_0000020")
    assert len(glob.glob(os.path.join(d2, "*.distcp"))) >= 3  # several units: the workers shared them
    a, b = _tensors(one), _tensors(two)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # 20KB is below an expert stack's size (8 experts, 64 KB): its experts are split between files,
    # the files keep to the size, and the tensors are still the mean
    x, y = _tensors(os.path.join(two_layouts, "iter_0000010")), _tensors(os.path.join(two_layouts, "iter_0000020"))
    assert all(torch.equal(a[k], (x[k].float() * 0.5 + y[k].float() * 0.5).to(x[k].dtype)) for k in a)
    md = TorchDistReader(one).metadata
    fc1 = "decoder.layers.1.mlp.experts.experts.linear_fc1.weight"
    assert len({info.relative_path for idx, info in md.storage_data.items() if idx.fqn == fc1}) >= 3
    per_file = {}  # the tensor records of each file (the last also holds the carried objects)
    for idx, info in md.storage_data.items():
        if idx.offset is not None:
            per_file.setdefault(info.relative_path, []).append(info.length)
    assert len(per_file) >= 3
    for f, lengths in per_file.items():
        assert sum(lengths) <= 20 * 1024 + 4096 * len(lengths) or len(lengths) == 1, (f, lengths)
    for d in (d1, d2):  # written by write_metadata before the rename, and it verifies
        assert sorted(manifest.read_manifest(d)) == manifest.checkpoint_files(d) and manifest.verify(d) is None
    capsys.readouterr()
    # --hf: the workers receive the merge as its plan and write the same shards
    hf1, hf3 = str(tmp_path / "hf1"), str(tmp_path / "hf3")
    hf_args = [two_layouts, "--last", "2", "--hf", "--no-progress", "--dtype", "fp32", "--file-size", "40KB"]
    assert merge_main(hf_args + ["--out", hf1]) == 0
    assert merge_main(hf_args + ["--out", hf3, "--workers", "3"]) == 0
    assert len(glob.glob(os.path.join(hf3, "*.safetensors"))) >= 3
    assert_identical(hf1, hf3)
    # an output that holds an input is refused even with --force
    assert merge_main([two_layouts, "--last", "1", "--out", two_layouts, "--force", "--no-progress"]) == 2
    assert "contains the input" in capsys.readouterr().err
    assert os.path.isdir(os.path.join(two_layouts, "iter_0000010"))


def test_merge_ranks_split_the_files_and_a_rerun_redoes_only_missing_ones(two_layouts, tmp_path, monkeypatch):
    """ling-merge on several "nodes" (--rank/--world-size, or RANK/WORLD_SIZE): the ranks share the
    output files, the last to finish publishes the same bytes as one process; a rank killed
    mid-file redoes only that file; a staging dir of another merge is refused; --hf likewise."""
    from megatron_ling.convert import parallel_exec as P

    args = [two_layouts, "--last", "2", "--shape", "linear", "--no-progress", "--file-size", "20KB"]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    assert merge_main(args + ["--out", ref]) == 0
    plan = plan_merge([two_layouts], last=2, shape="linear")
    r0 = merge(plan, out, show_progress=False, file_size=20 * 1024, rank=0, world_size=3)
    assert not r0.run.finalized and r0.run.missing > 0 and not os.path.exists(out)
    staging = str(tmp_path / ".out.staging")
    lost = r0.run.ran[-1]  # rank 0 was killed while writing this file: half written, no marker
    marker = os.path.join(staging, P.UNITS, f"{lost:06d}.json")
    with open(marker) as f:
        written = json.load(f)["sizes"]
    os.remove(marker)
    for name in written:
        path = os.path.join(staging, P.OUT, name)
        os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(LingConfigError, match="belongs to a different conversion"):
        merge(plan_merge([two_layouts], last=2, shape="weights", weights=[0.9, 0.1]), out, show_progress=False, file_size=20 * 1024,
              rank=0, world_size=3)
    again = merge(plan, out, show_progress=False, file_size=20 * 1024, rank=0, world_size=3)
    assert again.run.ran == [lost] and sorted(again.run.skipped + [lost]) == r0.run.ran
    assert merge_main(args + ["--out", out, "--rank", "2", "--world-size", "3", "--workers", "2"]) == 0
    assert not os.path.exists(out)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    r1 = merge(plan, out, show_progress=False, file_size=20 * 1024)
    assert r1.run.finalized and r1.run.missing == 0 and len(r1.run.records) >= 3
    assert_identical(ref, out)
    assert sorted(os.listdir(tmp_path)) == ["out", "ref"]  # staging dir gone
    # --hf on two ranks, in reverse order, equals the one-process export
    hf_ref, hf = str(tmp_path / "hf_ref"), str(tmp_path / "hf")
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert merge_main(args + ["--hf", "--out", hf_ref]) == 0
    for rank in (1, 0):
        r = merge(plan, hf, hf=True, show_progress=False, file_size=20 * 1024, rank=rank, world_size=2)
        assert r.run.finalized == (rank == 0) and r.run.ran
    assert_identical(hf_ref, hf)


def test_expert_bias_last_and_merge_of_one_checkpoint_is_the_identity(two_layouts, tmp_path):
    out = str(tmp_path / "one")
    assert merge_main([two_layouts, "--last", "1", "--out", out, "--no-progress"]) == 0
    b, m = _tensors(os.path.join(two_layouts, "iter_0000020")), _tensors(out)
    assert all(torch.equal(m[k], b[k]) for k in b)
    out2 = str(tmp_path / "last_bias")
    assert merge_main([two_layouts, "--last", "2", "--shape", "mean", "--expert-bias", "last",
                       "--out", out2, "--no-progress"]) == 0
    a, m2 = _tensors(os.path.join(two_layouts, "iter_0000010")), _tensors(out2)
    for k in m2:
        want = b[k] if k.endswith("expert_bias") else (a[k] * 0.5 + b[k] * 0.5)
        assert torch.equal(m2[k], want), k


def test_dry_run_prints_the_plan_and_writes_nothing(two_layouts, tmp_path, capsys):
    out = str(tmp_path / "never")
    assert merge_main([two_layouts, "--last", "2", "--shape", "linear", "--dry-run", "--out", out]) == 0
    text = capsys.readouterr().out
    assert "iter_0000010" in text and "iter_0000020" in text and "0.500000" in text and "sum c = 1.000000" in text
    assert not os.path.exists(out)


def test_refusals_are_one_line(two_layouts, tmp_path, capsys):
    # an uneven window: iteration 30 missing between 20 and 40
    gap = str(tmp_path / "gap")
    shutil.copytree(two_layouts, gap)
    shutil.copytree(os.path.join(gap, "iter_0000020"), os.path.join(gap, "iter_0000040"))
    other = str(tmp_path / "other")  # a different model (more experts)
    save_megatron_checkpoint(CFG.replace(num_experts=16), other, {}, 1, iteration=30, seed=3)
    exists = str(tmp_path / "exists")
    os.makedirs(exists)
    cases = [
        ([gap, "--last", "3", "--dry-run"], "error: --last: iteration 30 is missing from the window 10..40"),
        ([two_layouts, "--last", "3", "--dry-run"], "error: --last: the window of 3 checkpoints is longer than the 2"),
        ([two_layouts, "--iterations", "10", "15", "--dry-run"], "error: --iterations: iteration 15 is missing"),
        ([two_layouts, other, "--last", "3", "--dry-run"], "are different models (num_experts 8 vs 16)"),
        ([two_layouts, "--last", "2", "--out", exists], f"error: output: {exists} already exists; pass --force"),
        ([two_layouts, "--dry-run"], "error: --last/--iterations: give exactly one"),
        ([str(tmp_path / "nope"), "--last", "1", "--dry-run"], "is not a directory"),
    ]
    for argv, msg in cases:
        assert merge_main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and msg in err, (argv, err)
    assert os.listdir(exists) == []
    # --force replaces
    assert merge_main([two_layouts, "--last", "1", "--out", exists, "--force", "--no-progress"]) == 0
    assert os.path.exists(os.path.join(exists, "iter_0000020", ".metadata"))


# ----------------------------------------------------------- with the project's real trainer
SMALL = ["training.seq_length=64", "training.micro_batch_size=4", "training.global_batch_size=8",
         "lr.warmup_iters=2", "logging.log_interval=1", "lr.schedule=constant"]


def _train(run_dir, *overrides):
    cmd = [sys.executable, "-m", "megatron_ling.training.cli", "--nproc-per-node", "2", "--config", "quickstart",
           f"run_dir={run_dir}", *SMALL, *overrides]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


@pytest.mark.slow
def test_merged_trainer_checkpoints_resume_in_ling_train_and_export(tmp_path):
    run = str(tmp_path / "run")
    out = _train(run, "training.train_iters=6", "checkpoint.interval=2", "logging.peak_tflops=0.1")
    # the console line carries Megatron-LM's throughput per GPU and the MFU (peak from the recipe)
    line = next(x for x in out.splitlines() if x.startswith("iter 6/6"))
    assert "TFLOP/s/GPU " in line and "MFU " in line and "%" in line, line
    metrics = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    assert all(m["tflops_per_gpu"] > 0 and 0 < m["mfu"] < 1 for m in metrics)
    ckpt = os.path.join(run, "checkpoints")
    merged = str(tmp_path / "merged")
    assert merge_main([ckpt, "--last", "3", "--shape", "1-sqrt", "--out", merged, "--no-progress"]) == 0
    plan = plan_merge([ckpt], last=3)
    assert plan.iterations == [2, 4, 6]
    # merged = Σ c_j θ_j of the trainer's checkpoints (saved with distributed-optimizer state, TP2 x EP2)
    m = _tensors(merged)
    src = [_tensors(os.path.join(ckpt, f"iter_{i:07d}")) for i in (2, 4, 6)]
    k = "decoder.layers.1.mlp.experts.experts.linear_fc1.weight"
    k = k if k in m else next(x for x in m if "experts" in x)
    want = src[0][k] * plan.coefficients[0] + src[1][k] * plan.coefficients[1]
    want = want + src[2][k] * plan.coefficients[2]
    assert torch.equal(m[k], want)
    assert not any(x.startswith("optimizer.") for x in TorchDistReader(merged).tensors)

    # resume: weights only, iteration 6 -> 8, LR schedule continues, fresh optimizer moments
    resumed = str(tmp_path / "resumed")
    out = _train(resumed, "training.train_iters=8", f"checkpoint.resume={merged}")
    assert "weights only" in out and "starting at iteration 6" in out, out[-2000:]
    got = [json.loads(x) for x in open(os.path.join(resumed, "metrics.jsonl"))]
    assert [g["iteration"] for g in got] == [7, 8] and all(math.isfinite(g["lm_loss"]) for g in got)
    # finetune: weights only from iteration 0
    ft = str(tmp_path / "ft")
    out = _train(ft, "training.train_iters=2", f"checkpoint.resume={merged}", "checkpoint.finetune=true",
                 "checkpoint.save=false")
    assert "starting at iteration 0" in out

    # export with ling-convert, and straight to HF with --hf: the same tensors
    from megatron_ling.convert.cli import main as convert_main

    hf1, hf2 = str(tmp_path / "hf1"), str(tmp_path / "hf2")
    assert convert_main(["to-hf", merged, hf1, "--dtype", "fp32", "--no-progress"]) == 0
    assert merge_main([ckpt, "--last", "3", "--hf", "--dtype", "fp32", "--out", hf2, "--no-progress"]) == 0
    a = {k: v for f in glob.glob(os.path.join(hf1, "*.safetensors")) for k, v in load_file(f).items()}
    b = {k: v for f in glob.glob(os.path.join(hf2, "*.safetensors")) for k, v in load_file(f).items()}
    assert set(a) == set(b) and len(a) > 50 and all(torch.equal(a[x], b[x]) for x in a)
    assert json.load(open(os.path.join(hf2, "config.json")))["num_experts"] == 8
