"""Tiny real `ling-train` / `ling-convert` runs in subprocesses (the reliability and checksum
tests): 1 rank, the tiny preset, mock data."""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["parallel.tp=1", "parallel.ep=1", "training.seq_length=32", "training.micro_batch_size=2",
        "training.global_batch_size=2", "logging.log_interval=1", "data.mock=true", "lr.warmup_iters=0"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": ROOT}


def train_cmd(run_dir, *overrides):
    return [sys.executable, "-m", "megatron_ling.training.cli", "--nproc-per-node", "1", "--config", "quickstart",
            f"run_dir={run_dir}", *TINY, *overrides]


def train(run_dir, *overrides, timeout=600):
    return subprocess.run(train_cmd(run_dir, *overrides), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=ENV)


def convert(*argv):
    return subprocess.run([sys.executable, "-m", "megatron_ling.convert.cli", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=ENV)


def error_lines(p):
    return [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]


def tree(path):
    """Every file under path with its size (what 'nothing was deleted' compares)."""
    return {os.path.relpath(os.path.join(d, f), path): os.path.getsize(os.path.join(d, f))
            for d, _, fs in os.walk(path) for f in fs}


def trained_run(root):
    """A finished 4-iteration run under ``root`` with checkpoints at 2 and 4 (the session fixture
    ``trained`` in conftest.py; copy it before changing it)."""
    run = os.path.join(root, "run")
    p = train(run, "training.train_iters=4", "checkpoint.interval=2")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return run


def copy_run(trained, tmp_path, name="run"):
    dst = str(tmp_path / name)
    shutil.copytree(trained, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def ckpts(run):
    return os.path.join(run, "checkpoints")
