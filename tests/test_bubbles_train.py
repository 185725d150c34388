"""ling-train end to end with `parallel.pipeline_layout: auto` (the planner) and the bubble
profiler on, then `ling-bubbles report` on the run directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_ling.models.config import get_preset
from megatron_ling.parallel.config import ParallelConfig
from megatron_ling.pipeline.planner import plan_layout


@pytest.mark.slow
def test_train_auto_layout_with_profiler_then_report(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_ling.training.cli", "--nproc-per-node", "2", "--config", "quickstart",
           f"run_dir={run}", "parallel.tp=1", "parallel.ep=1", "parallel.pp=2", "parallel.pipeline_layout=auto",
           "training.train_iters=3", "lr.warmup_iters=1", "training.micro_batch_size=2",
           "training.global_batch_size=8", "checkpoint.save=false", "profiling.enabled=true", "profiling.steps=[2,3]"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    files = sorted(os.listdir(run / "bubbles"))
    assert files == ["rank00000.json", "rank00001.json"]
    doc = json.load(open(run / "bubbles" / "rank00001.json"))
    assert [s["iteration"] for s in doc["steps"]] == [2, 3]
    # the layout the trainer ran is the planner's for this recipe (4 micro batches of 2 x 128)
    want = plan_layout(get_preset("ling-tiny"), ParallelConfig(pp=2), 128, 2, 4)
    assert doc["meta"]["layout"] == want
    kinds = {e[0] for e in doc["steps"][0]["events"]}
    assert kinds == {"F", "B", "W"}
    r = subprocess.run([sys.executable, "-m", "megatron_ling.profiling.bubbles_cli", "report", str(run)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"layout: {want}" in r.stdout
    for f in ("report.txt", "report.json", "trace.json", "timeline.png"):
        assert (run / "bubbles" / "report" / f).stat().st_size > 0
