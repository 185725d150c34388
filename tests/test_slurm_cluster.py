"""ling-slurm against a real Slurm: slurmctld + 2 slurmd on loopback (fake nodes n1, n2), started by
slurm/local_cluster.sh (which apt-installs the Debian packages when they are missing; needs root).

If the cluster cannot start, these tests FAIL (no skip): CI runs them as root with apt available.
Training jobs run the real trainer (ling-train's module) on CPU with gloo, with the built-in tiny
quick-start recipe and a few iterations:
  - 1 node x 2 srun tasks: trains, loss falls; it is also the uninterrupted reference run
  - 2 nodes x 1 process, torchrun c10d rendezvous on n1: same losses as the reference
  - preemption: USR1 to the batch script -> checkpoint, requeue, resume; no step lost or repeated,
    losses equal the reference's at every step
  - SIGKILL of every rank while a checkpoint is being saved: FAILED, not requeued; resubmission
    resumes from the previous complete checkpoint
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from megatron_ling.launch import slurmctl
from tests.support.trees import assert_identical

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "slurm" / "local_cluster.sh"
QUICKSTART = "quickstart"  # built-in recipe: megatron_ling/recipes/quickstart.yaml
ITERS = 6
CKPT_INTERVAL = 2
TRAIN_OVERRIDES = [f"training.train_iters={ITERS}", f"checkpoint.interval={CKPT_INTERVAL}", "logging.log_interval=1",
                   "lr.warmup_iters=1"]
CPU2 = ["--gpus-per-node", "0", "--procs-per-node"]
JOB_TIMEOUT = 240  # seconds for one job, queueing included (2 shared cores)
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}
LOSS_RTOL = 1e-5  # same world size, same data order, gloo on CPU: resumed runs match to rounding
# the cluster listens on fixed ports (slurm/local_cluster.sh): one suite at a time (tools/test_all.sh)
pytestmark = pytest.mark.slurm



# ------------------------------------------------------------------------------------ cluster
def _controller_up() -> bool:
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "is UP" in out


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start the local cluster (idempotent); stop it at the end only if this session started it."""
    was_up = _controller_up()
    t0 = time.time()
    proc = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"could not start the local Slurm cluster ({CLUSTER_SCRIPT} start, rc={proc.returncode}):\n"
                    f"{proc.stdout}\n{proc.stderr}")
    print(f"local Slurm cluster ready in {time.time() - t0:.1f}s: {proc.stdout.strip().splitlines()[-1]}")
    yield
    if not was_up:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------------ helpers
STARTED: list[str] = []  # every job a test submitted; cancelled after the test if still alive


@pytest.fixture(autouse=True)
def _cancel_started_jobs():
    """A test stops what it starts, also when it fails: a failed assertion must not leave a training
    job running on the cluster (a kill-during-save job once ran on for ten minutes)."""
    yield
    while STARTED:
        job = STARTED.pop()
        info = slurmctl.show_job(job)
        if info and info.get("JobState") not in TERMINAL:
            subprocess.run(["scancel", job], capture_output=True, timeout=30)


def ling_slurm(*args, cwd, timeout=180):
    proc = subprocess.run([sys.executable, "-m", "megatron_ling.launch.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode == 0 and args and args[0] in ("submit", "resubmit"):
        words = proc.stdout.split()
        if len(words) > 2 and words[2].isdigit():
            STARTED.append(words[2])
    return proc.returncode, proc.stdout, proc.stderr


def submit(cwd, *args):
    """ling-slurm submit ...; returns (job id, run dir)."""
    rc, out, err = ling_slurm("submit", *args, cwd=cwd)
    assert rc == 0, f"submit failed: {err}{out}"
    fields = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    job = out.split()[2]
    assert job.isdigit() and Path(fields["log"]).name == f"slurm-{job}.out", out
    return job, Path(fields["run dir"])


def log_text(run_dir: Path, job: str) -> str:
    path = run_dir / "logs" / f"slurm-{job}.out"
    return path.read_text(errors="replace") if path.exists() else "(no log)"


def wait_job(job: str, run_dir: Path, timeout: float = JOB_TIMEOUT, until=None) -> dict:
    """Poll scontrol until the job is finished (or `until(info)` holds); fail with the log on timeout."""
    deadline = time.time() + timeout
    info = None
    while time.time() < deadline:
        info = slurmctl.show_job(job)
        if info and (until(info) if until else info.get("JobState") in TERMINAL):
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job], capture_output=True)
    pytest.fail(f"job {job} not done after {timeout:.0f}s (state {info and info.get('JobState')}); log:\n"
                f"{log_text(run_dir, job)[-4000:]}")


def metrics(run_dir: Path):
    """[(iteration, lm_loss)] in file order, from the trainer's metrics file (logging.metrics_file)."""
    from megatron_ling.training.recipe import load_recipe

    path = Path(load_recipe(str(run_dir / "job.recipe.yaml")).metrics_file)
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(int(r["iteration"]), float(r["lm_loss"])) for r in rows if "lm_loss" in r]


def exit_records(run_dir: Path, job: str):
    """{restart: {"reason", "iteration"}} written by the trainer through LING_EXIT_FILE."""
    out = {}
    for p in (run_dir / "control").glob(f"exit-{job}-*.json"):
        out[int(p.stem.rsplit("-", 1)[1])] = json.loads(p.read_text().splitlines()[0])
    return out


def assert_matches_reference(rows, reference, what):
    ref = dict(reference)
    for it, loss in rows:
        assert loss == pytest.approx(ref[it], rel=LOSS_RTOL), f"{what}: iteration {it} loss {loss} != reference {ref[it]}"


def wait_for_iterations(run_dir: Path, job: str, n: int, timeout: float = JOB_TIMEOUT):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(metrics(run_dir)) >= n:
            return
        info = slurmctl.show_job(job)
        if info and info.get("JobState") in TERMINAL:
            pytest.fail(f"job {job} ended ({info['JobState']}) before iteration {n}:\n{log_text(run_dir, job)[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"job {job}: no iteration {n} after {timeout:.0f}s:\n{log_text(run_dir, job)[-4000:]}")


# ------------------------------------------------------------------------- the reference run
@pytest.fixture(scope="module")
def reference_run(slurm_cluster, tmp_path_factory):
    """1 node, 2 srun tasks (SLURM_PROCID -> RANK), ITERS iterations, uninterrupted."""
    cwd = tmp_path_factory.mktemp("ref")
    t0 = time.time()
    job, run_dir = submit(cwd, QUICKSTART, "--nodes", "1", *CPU2, "2", "--launcher", "srun",
                          "--time", "10", "--run-dir", cwd / "run", *TRAIN_OVERRIDES)
    info = wait_job(job, run_dir)
    return dict(job=job, run_dir=run_dir, info=info, seconds=time.time() - t0, cwd=cwd)


@pytest.mark.slow
def test_one_node_two_tasks_trains_and_loss_falls(reference_run):
    job, run_dir, info = reference_run["job"], reference_run["run_dir"], reference_run["info"]
    log = log_text(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", log[-4000:]
    rows = metrics(run_dir)
    assert [it for it, _ in rows] == list(range(1, ITERS + 1)), log[-4000:]
    losses = [loss for _, loss in rows]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.05, f"loss did not fall: {losses}"
    assert exit_records(run_dir, job) == {0: {"reason": "completed", "iteration": ITERS}}
    assert "launcher srun" in log and "training completed" in log

    # the run directory records what ran
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert prov["world_size"] == 2 and prov["megatron_ling_version"] and "spec" in prov
    assert "torch==" in (run_dir / "pip-freeze.txt").read_text()
    from megatron_ling.training.recipe import load_recipe

    recipe = load_recipe(str(run_dir / "job.recipe.yaml"))
    assert recipe.run_dir == str(run_dir) and recipe.training.train_iters == ITERS

    # status / logs
    rc, out, err = ling_slurm("status", job, cwd=reference_run["cwd"])
    assert rc == 0 and "COMPLETED" in out and f"run dir: {run_dir}" in out and '"completed"' in out, err
    rc, out, _ = ling_slurm("logs", run_dir, "-n", "0", cwd=reference_run["cwd"])
    assert rc == 0 and out.strip() == log.strip()
    print(f"reference run: {reference_run['seconds']:.1f}s submit->done, losses {losses[0]:.4f} -> {losses[-1]:.4f}")


@pytest.mark.slow
def test_two_nodes_one_training_through_rendezvous_on_node1(reference_run, tmp_path):
    """1 process per fake node: a world of 2 exists only if both nodes met in the rendezvous."""
    t0 = time.time()
    job, run_dir = submit(tmp_path, QUICKSTART, "--nodes", "2", *CPU2, "1", "--time", "10",
                          "--run-dir", tmp_path / "run", *TRAIN_OVERRIDES)
    info = wait_job(job, run_dir)
    log = log_text(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "n[1-2]", log[-4000:]
    assert "node n1 (node id 0): torchrun" in log and "node n2 (node id 1): torchrun" in log
    assert "rendezvous n1:" in log  # MASTER_ADDR = first host of the allocation
    rows = metrics(run_dir)
    assert [it for it, _ in rows] == list(range(1, ITERS + 1))
    # same world size and recipe as the 1-node reference: the same training, step for step
    assert_matches_reference(rows, metrics(reference_run["run_dir"]), "2-node run")
    print(f"2-node run: {time.time() - t0:.1f}s submit->done")


@pytest.mark.slow
def test_preemption_checkpoints_requeues_and_resumes(reference_run, tmp_path):
    t0 = time.time()
    job, run_dir = submit(tmp_path, QUICKSTART, "--nodes", "2", *CPU2, "1", "--time", "10",
                          "--max-restarts", "2", "--run-dir", tmp_path / "run", *TRAIN_OVERRIDES)
    wait_for_iterations(run_dir, job, 2)
    # what Slurm does --signal seconds before the time limit, made deterministic
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=30)
    info = wait_job(job, run_dir)
    log = log_text(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-4000:]
    recs = exit_records(run_dir, job)
    assert recs[0]["reason"] == "preempted", f"training finished before the stop request: {recs}\n{log[-3000:]}"
    stopped_at = recs[0]["iteration"]
    assert 2 <= stopped_at < ITERS and recs[1] == {"reason": "completed", "iteration": ITERS}
    assert "received SIGUSR1" in log and "requeueing (restart 1" in log

    rows = metrics(run_dir)
    # every step exactly once across the two runs, in order: none lost, none repeated
    assert [it for it, _ in rows] == list(range(1, ITERS + 1)), rows
    assert_matches_reference(rows, metrics(reference_run["run_dir"]), "preempted+resumed run")
    print(f"preemption: stopped at {stopped_at}, resumed, {time.time() - t0:.1f}s submit->done")


KILL_DURING_SAVE = textwrap.dedent('''
    """Test fault: every rank SIGKILLs itself in the middle of saving checkpoint iteration
    LING_TEST_KILL_AT - its shards are written (into iter_N.tmp) but the directory is not renamed and
    the tracker file not updated. Fires once: a marker file records it."""
    import os, re, signal, sys
    import torch
    from megatron.core import dist_checkpointing

    KILL_AT = int(os.environ["LING_TEST_KILL_AT"])
    MARKER = os.environ["LING_TEST_KILL_MARKER"]
    _save = dist_checkpointing.save

    def save(sharded_state_dict, checkpoint_dir, *args, **kwargs):
        result = _save(sharded_state_dict, checkpoint_dir, *args, **kwargs)
        m = re.search(r"iter_(\\d+)", str(checkpoint_dir))
        if m and int(m.group(1)) == KILL_AT and not os.path.exists(MARKER):
            torch.distributed.barrier()  # all shards written on every rank
            if torch.distributed.get_rank() == 0:
                open(MARKER, "w").close()
            torch.distributed.barrier()
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    dist_checkpointing.save = save
    from megatron_ling.training.cli import main
    sys.exit(main())
''')


@pytest.mark.slow
def test_kill_during_checkpoint_save_resumes_from_previous_complete(reference_run, tmp_path):
    kill_at = 2 * CKPT_INTERVAL
    (tmp_path / "fault").mkdir()
    (tmp_path / "fault" / "kill_during_save.py").write_text(KILL_DURING_SAVE)
    marker = tmp_path / "killed"
    job, run_dir = submit(tmp_path, QUICKSTART, "--nodes", "1", *CPU2, "2", "--time", "10",
                          "--entry-module", "kill_during_save", "--env", f"PYTHONPATH={tmp_path / 'fault'}",
                          "--env", f"LING_TEST_KILL_AT={kill_at}", "--env", f"LING_TEST_KILL_MARKER={marker}",
                          "--run-dir", tmp_path / "run", *TRAIN_OVERRIDES)
    info = wait_job(job, run_dir)
    log = log_text(run_dir, job)
    assert marker.exists(), f"the fault never fired:\n{log[-4000:]}"
    # a crash is not a preemption: FAILED, not requeued
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log[-4000:]
    assert "not requeued" in log
    first = metrics(run_dir)
    assert first and first[-1][0] >= kill_at
    from megatron_ling.checkpoint.layout import latest_iteration
    from megatron_ling.training.recipe import load_recipe

    ckpt_dir = load_recipe(str(run_dir / "job.recipe.yaml")).checkpoint_dir
    assert latest_iteration(ckpt_dir) == CKPT_INTERVAL  # the killed save never became the latest

    rc, out, err = ling_slurm("resubmit", run_dir, cwd=tmp_path)
    assert rc == 0, err
    job2 = out.split()[2]
    info2 = wait_job(job2, run_dir)
    log2 = log_text(run_dir, job2)
    assert info2["JobState"] == "COMPLETED", log2[-4000:]
    rows = metrics(run_dir)
    second = rows[len(first):]
    # resumed from the last complete checkpoint (CKPT_INTERVAL), not the killed one (kill_at)
    assert [it for it, _ in second] == list(range(CKPT_INTERVAL + 1, ITERS + 1)), rows
    assert_matches_reference(second, metrics(reference_run["run_dir"]), "run resumed after the kill")


def _sbatch_convert(tmp_path, ckpt, out, *extra, settings=None):
    # small shards: several units, so that the array tasks below really split the plan
    env = {**os.environ, "SRC": ckpt, "DST": str(out), "PYTHON": sys.executable, "WORKERS": "1",
           "CONVERT_ARGS": "--shard-size 200KB", **(settings or {})}
    proc = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", "--mem=100", *extra,
                           str(REPO / "slurm" / "convert.sbatch")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    STARTED.append(job)
    return job


@pytest.mark.slow
def test_convert_template_exports_the_reference_checkpoint(reference_run, tmp_path):
    """slurm/convert.sbatch as a user runs it: settings from the environment, plain sbatch; then
    as a 2-task Slurm array (both tasks running at once on the cluster's nodes, each converting its
    share of the plan, the last finisher publishing): the same bytes as the one-node export, and
    nothing left beside the output."""
    from safetensors import safe_open

    from megatron_ling.training.recipe import load_recipe

    ckpt = load_recipe(str(reference_run["run_dir"] / "job.recipe.yaml")).checkpoint_dir
    out = tmp_path / "hf"
    job = _sbatch_convert(tmp_path, ckpt, out)
    info = wait_job(job, tmp_path, timeout=180)
    log = (tmp_path / f"ling-convert-{job}.out").read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert (out / "config.json").exists()
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 3, log[-3000:]
    names = set()
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            names.update(f.keys())
    assert "lm_head.weight" in names  # an HF BailingMoeV2 tensor name

    arr = tmp_path / "arr"
    arr.mkdir()
    out2 = arr / "hf"
    job = _sbatch_convert(arr, ckpt, out2, "--array=0-1", "--output=%x-%A_%a.out")
    states = {t: wait_job(f"{job}_{t}", arr, timeout=240)["JobState"] for t in (0, 1)}
    logs = {t: (arr / f"ling-convert-{job}_{t}.out").read_text(errors="replace") for t in (0, 1)}
    ran = 0
    for t in (0, 1):
        assert states[t] == "COMPLETED", logs[t][-3000:]
        assert f"array task {t} of 2" in logs[t], logs[t][-3000:]
        m = re.search(r": (\d+) of (\d+) units converted here", logs[t])
        assert m and 0 < int(m.group(1)) < int(m.group(2)), logs[t][-3000:]  # each task did a share
        assert "[convert]" in logs[t] and "done" in logs[t].splitlines()[-1], logs[t][-3000:]
        ran += int(m.group(1))
    assert ran == len(shards)
    assert_identical(str(out2), str(out))
    assert sorted(p.name for p in arr.iterdir()) == sorted(["hf", *(f"ling-convert-{job}_{t}.out" for t in (0, 1))])


@pytest.mark.slow
def test_convert_template_merges_as_an_array(reference_run, tmp_path):
    """DIRECTION=merge: ling-merge of the run's last two checkpoints as a 2-task Slurm array, each
    task merging its share of the output files: the same bytes as the merge in one process."""
    from megatron_ling.merge.cli import main as merge_main
    from megatron_ling.training.recipe import load_recipe

    ckpt = load_recipe(str(reference_run["run_dir"] / "job.recipe.yaml")).checkpoint_dir
    window = ["--last", "2", "--file-size", "200KB"]
    ref = tmp_path / "ref"
    assert merge_main([ckpt, *window, "--out", str(ref), "--no-progress"]) == 0
    arr = tmp_path / "arr"
    arr.mkdir()
    out = arr / "merged"
    job = _sbatch_convert(arr, ckpt, out, "--array=0-1", "--output=%x-%A_%a.out",
                          settings=dict(DIRECTION="merge", CONVERT_ARGS=" ".join(window)))
    states = {t: wait_job(f"{job}_{t}", arr, timeout=240)["JobState"] for t in (0, 1)}
    logs = {t: (arr / f"ling-convert-{job}_{t}.out").read_text(errors="replace") for t in (0, 1)}
    for t in (0, 1):
        assert states[t] == "COMPLETED", logs[t][-3000:]
        m = re.search(r": (\d+) of (\d+) units converted here", logs[t])
        assert m and 0 < int(m.group(1)) < int(m.group(2)), logs[t][-3000:]  # each task did a share
    assert_identical(str(out), str(ref))
    assert sorted(p.name for p in arr.iterdir()) == sorted(["merged", *(f"ling-convert-{job}_{t}.out" for t in (0, 1))])


# ------------------------------------------------------------------ sbatch's own rejections
@pytest.mark.parametrize("args,needle", [
    (["--partition", "nosuchpartition"], "partition"),
    (["--mem", "100000000"], "node configuration is not available"),  # 100 TB per node
])
def test_sbatch_rejection_is_one_line(slurm_cluster, tmp_path, args, needle):
    rc, out, err = ling_slurm("submit", QUICKSTART, "--nodes", "1", *CPU2, "2", "--run-dir", tmp_path / "run",
                              *args, cwd=tmp_path)
    assert rc == 2 and out == "", out
    assert err.startswith("error: sbatch rejected the job: ") and err.count("\n") == 1, err
    assert needle in err.lower() or needle in err, err
    assert not (tmp_path / "run").exists()  # nothing ran: no half-made run directory


def test_status_logs_cancel_of_a_held_job(slurm_cluster, tmp_path):
    job, run_dir = submit(tmp_path, QUICKSTART, "--nodes", "1", *CPU2, "2", "--sbatch=--hold",
                          "--run-dir", tmp_path / "run")
    rc, out, err = ling_slurm("status", run_dir, cwd=tmp_path)
    assert rc == 0 and f"job {job}" in out and "PENDING" in out, (out, err)
    rc, out, err = ling_slurm("logs", job, cwd=tmp_path)
    assert rc == 2 and err.startswith("error: no log for job") and err.count("\n") == 1
    rc, out, err = ling_slurm("cancel", job, cwd=tmp_path)
    assert rc == 0 and "cancelled" in out, err
    info = wait_job(job, run_dir, timeout=60)
    assert info["JobState"] == "CANCELLED"
    rc, out, err = ling_slurm("status", job, cwd=tmp_path)
    assert rc == 0 and "CANCELLED" in out


def test_templates_pass_sbatch_test_only(slurm_cluster, tmp_path):
    """sbatch parses every #SBATCH line of the slurm/ templates (GPU/CPU counts scaled to this cluster)."""
    for name in ("train.sbatch", "convert.sbatch", "bubbles.sbatch"):
        proc = subprocess.run(["sbatch", "--test-only", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=100",
                               str(REPO / "slurm" / name)], capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert proc.returncode == 0 and "to start at" in proc.stderr, f"{name}: {proc.stderr}"


# ------------------------------------------- stop-request mechanics with a contract stand-in
# The trainer's side of the contract (stop file / USR1 -> exit record -> exit 0) in a few lines, so
# the batch script's decisions are checked without paying for a model: cluster mechanics only.
STOPPABLE = textwrap.dedent('''
    import json, os, signal, sys, time
    got = []
    signal.signal(signal.SIGUSR1, lambda *_: got.append("USR1"))
    rank, ready = int(os.environ["RANK"]), os.environ["READY_FILE"]
    if rank == 0:
        open(ready, "w").close()
    deadline = time.time() + 120
    while not got and not os.path.exists(os.environ["LING_STOP_FILE"]):
        if time.time() > deadline:
            sys.exit(3)
        time.sleep(0.1)
    if rank == 0:
        with open(os.environ["LING_EXIT_FILE"], "w") as f:
            f.write(json.dumps({"reason": "preempted", "iteration": 7}) + "\\n")
''')


@pytest.mark.parametrize("how", ["cancel --checkpoint", "restarts used up"])
def test_stop_without_requeue(slurm_cluster, tmp_path, how):
    (tmp_path / "mod").mkdir()
    (tmp_path / "mod" / "stoppable.py").write_text(STOPPABLE)
    ready = tmp_path / "ready"
    job, run_dir = submit(tmp_path, QUICKSTART, "--nodes", "1", *CPU2, "2", "--launcher", "srun",
                          "--max-restarts", "0" if how == "restarts used up" else "3",
                          "--entry-module", "stoppable", "--env", f"PYTHONPATH={tmp_path / 'mod'}",
                          "--env", f"READY_FILE={ready}", "--run-dir", tmp_path / "run")
    deadline = time.time() + JOB_TIMEOUT
    while not ready.exists():
        assert time.time() < deadline, log_text(run_dir, job)
        time.sleep(0.2)
    if how == "cancel --checkpoint":
        rc, out, err = ling_slurm("cancel", job, "--checkpoint", cwd=tmp_path)
        assert rc == 0 and "checkpoint and stop" in out, err
    else:
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=30)
    info = wait_job(job, run_dir, timeout=120)
    log = log_text(run_dir, job)
    assert info["Restarts"] == "0", log
    if how == "cancel --checkpoint":
        assert info["JobState"] == "COMPLETED" and "stopped on request" in log, log
    else:
        assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0" and "is used up" in log, log
