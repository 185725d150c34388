"""ling-slurm without a cluster: job spec checks, the rendered script's structure (parsed, not a
golden file), the hand-editable templates in slurm/, and one-line errors before anything is submitted.

The Slurm daemons are exercised in tests/test_slurm_cluster.py.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron_ling.errors import LingConfigError
from megatron_ling.launch.render import BODY_MARKER, parse_sbatch_header, render_train_script, train_body
from megatron_ling.launch.spec import SlurmJobSpec, parse_env, parse_signal, parse_slurm_time

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
QUICKSTART = "quickstart"  # built-in recipe: megatron_ling/recipes/quickstart.yaml


def ling_slurm(*args, cwd=None, env=None, timeout=120):
    """Run the real CLI in a fresh interpreter; returns (rc, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "megatron_ling.launch.cli", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def header_dict(script: str) -> dict:
    """#SBATCH options as {name: value} (flags -> True)."""
    out = {}
    for opt in parse_sbatch_header(script):
        name, sep, val = opt.lstrip("-").partition("=")
        out[name] = val if sep else True
    return out


def settings(script: str) -> dict:
    """The NAME=value lines of the settings block, as bash would parse them."""
    block = script.split("# ---- settings ----", 1)[1].split("# ----", 1)[0]
    out = {}
    for line in block.strip().splitlines():
        name, _, val = line.partition("=")
        out[name] = shlex.split(val.strip("()")) if val.startswith("(") else (shlex.split(val) or [""])[0]
    return out


def bash_syntax_ok(script: str, tmp_path: Path) -> None:
    path = tmp_path / "script.sh"
    path.write_text(script)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------------------- spec
@pytest.mark.parametrize("text,secs", [("30", 1800), ("1:30", 90), ("4:00:00", 14400), ("2-00", 172800),
                                       ("1-02:03", 93780), ("0-00:00:45", 45)])
def test_slurm_time_formats(text, secs):
    assert parse_slurm_time(text) == secs


@pytest.mark.parametrize("kwargs,needle", [
    (dict(nodes=0), "--nodes"),
    (dict(gpus_per_node=0), "--procs-per-node"),
    (dict(gpus_per_node=8, procs_per_node=4), "--procs-per-node 4 differs"),
    (dict(launcher="mpirun"), "--launcher"),
    (dict(time="4h"), "--time"),
    (dict(time="2", signal="USR1@180"), "lead time or raise --time"),
    (dict(signal="KILL@60"), "--signal"),
    (dict(signal="USR1@70000"), "1..65535"),
    (dict(max_restarts=-1), "--max-restarts"),
    (dict(container_mounts="/a:/b"), "--container-image"),
    (dict(job_name="has space"), "--job-name"),
    (dict(extra_sbatch=["reservation=x"]), "--sbatch"),
    (dict(partition=""), "--partition"),
])
def test_spec_rejects_with_one_line(kwargs, needle):
    with pytest.raises(LingConfigError) as e:
        SlurmJobSpec(**kwargs).validate()
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_env_and_signal_parsing():
    assert parse_env(["A=1", "NCCL_DEBUG=INFO", "X=a=b"]) == {"A": "1", "NCCL_DEBUG": "INFO", "X": "a=b"}
    for bad in ("NOEQUALS", "1A=2", "A-B=1"):
        with pytest.raises(LingConfigError):
            parse_env([bad])
    assert parse_signal("usr1@90") == ("USR1", 90) and parse_signal("SIGTERM@30") == ("TERM", 30)


def test_derived_resources():
    gpu = SlurmJobSpec(nodes=4, gpus_per_node=8).validate()
    assert (gpu.world_size, gpu.tasks_per_node, gpu.task_cpus) == (32, 1, 8)
    srun = SlurmJobSpec(nodes=2, gpus_per_node=8, launcher="srun", cpus_per_task=12).validate()
    assert (srun.world_size, srun.tasks_per_node, srun.task_cpus) == (16, 8, 12)
    cpu = SlurmJobSpec(nodes=2, gpus_per_node=0, procs_per_node=3).validate()
    assert (cpu.world_size, cpu.cpu_only) == (6, True)


# ------------------------------------------------------------------------------ rendered script
def test_torchrun_gpu_script_structure(tmp_path):
    spec = SlurmJobSpec(nodes=4, gpus_per_node=8, job_name="ling-mini", time="2-00:00:00", partition="gpu",
                        account="proj", qos="high", constraint="h100", exclusive=True, mem="0",
                        env={"NCCL_DEBUG": "INFO", "MY_VAR": "a b"}, signal="USR1@300", max_restarts=7,
                        extra_sbatch=["--reservation=big"], python="/opt/venv/bin/python")
    script = render_train_script(spec, "/scratch/run1", "/scratch/run1/recipe.yaml", ["training.train_iters=5"],
                                 workdir="/home/u/proj")
    assert script.startswith("#!/bin/bash\n")
    h = header_dict(script)
    assert h["nodes"] == "4" and h["ntasks-per-node"] == "1" and h["gpus-per-node"] == "8"
    assert h["cpus-per-task"] == "8"  # torchrun task: at least one CPU per worker
    assert (h["partition"], h["account"], h["qos"], h["constraint"], h["mem"]) == ("gpu", "proj", "high", "h100", "0")
    assert h["time"] == "2-00:00:00" and h["exclusive"] is True and h["reservation"] == "big"
    assert h["signal"] == "B:USR1@300" and h["requeue"] is True and h["open-mode"] == "append"
    assert h["output"] == "/scratch/run1/logs/slurm-%j.out" and h["chdir"] == "/home/u/proj"
    assert h["job-name"] == "ling-mini"

    s = settings(script)
    assert s["LAUNCHER"] == "torchrun" and s["NNODES"] == "4" and s["PROCS_PER_NODE"] == "8"
    assert s["MAX_RESTARTS"] == "7" and s["PYTHON"] == "/opt/venv/bin/python"
    assert s["OVERRIDES"] == ["training.train_iters=5"] and s["CONTAINER_ARGS"] == []
    assert s["ENTRY_MODULE"] == "megatron_ling.training.cli"

    # GPU defaults yield to the environment; --env values are fixed and win over defaults
    assert 'export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS-1}"' in script
    assert "export NCCL_DEBUG=INFO" in script and "NCCL_DEBUG-" not in script
    assert "export MY_VAR='a b'" in script
    assert "OMP_NUM_THREADS" not in script.split(BODY_MARKER)[0]

    body = script.split(BODY_MARKER, 1)[1]
    assert "torch.distributed.run" in body and "--rdzv-backend=c10d" in body
    assert '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"' in body
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in body
    assert 'scontrol requeue "$SLURM_JOB_ID"' in body and "LING_STOP_FILE" in body and "LING_EXIT_FILE" in body
    bash_syntax_ok(script, tmp_path)


def test_srun_cpu_script_structure(tmp_path):
    spec = SlurmJobSpec(nodes=2, gpus_per_node=0, procs_per_node=3, launcher="srun")
    script = render_train_script(spec, "/r", "/r/recipe.yaml")
    h = header_dict(script)
    assert "gpus-per-node" not in h and "gpus" not in h  # CPU run: no GPU request at all
    assert h["ntasks-per-node"] == "3" and h["cpus-per-task"] == "1" and h["nodes"] == "2"
    assert settings(script)["LAUNCHER"] == "srun"
    pre = script.split(BODY_MARKER)[0]
    assert 'export OMP_NUM_THREADS="${OMP_NUM_THREADS-1}"' in pre and "CUDA_DEVICE_MAX_CONNECTIONS" not in pre
    body = script.split(BODY_MARKER, 1)[1]
    # Slurm's task ids become torch.distributed's variables
    for want in ("RANK=$SLURM_PROCID", "LOCAL_RANK=$SLURM_LOCALID", "WORLD_SIZE=$SLURM_NTASKS"):
        assert want in body
    bash_syntax_ok(script, tmp_path)


def test_container_args_go_to_every_srun(tmp_path):
    spec = SlurmJobSpec(nodes=1, gpus_per_node=8, container_image="nvcr.io#nvidia/pytorch:25.01-py3",
                        container_mounts="/lustre:/lustre,/home:/home", container_workdir="/lustre/w")
    script = render_train_script(spec, "/r", "/r/recipe.yaml")
    assert settings(script)["CONTAINER_ARGS"] == [
        "--container-image=nvcr.io#nvidia/pytorch:25.01-py3", "--container-mounts=/lustre:/lustre,/home:/home",
        "--container-workdir=/lustre/w"]
    assert '${CONTAINER_ARGS[@]+"${CONTAINER_ARGS[@]}"}' in script.split(BODY_MARKER, 1)[1]
    bash_syntax_ok(script, tmp_path)


def test_rendered_body_is_the_packaged_template():
    script = render_train_script(SlurmJobSpec(gpus_per_node=0, procs_per_node=2), "/r", "/r/recipe.yaml")
    assert script.endswith(train_body().rstrip("\n") + "\n")


# --------------------------------------------------------------------------- slurm/ templates
@pytest.mark.parametrize("name", ["train.sbatch", "convert.sbatch", "bubbles.sbatch"])
def test_templates_have_headers_and_parse(name, tmp_path):
    text = (SLURM_DIR / name).read_text()
    assert text.startswith("#!/bin/bash\n")
    h = header_dict(text)
    for opt in ("job-name", "nodes", "time", "output"):
        assert opt in h, f"{name} lacks #SBATCH --{opt}"
    bash_syntax_ok(text, tmp_path)


def test_train_template_shares_the_launch_logic():
    """slurm/train.sbatch ends with the same launch logic every ling-slurm job runs."""
    text = (SLURM_DIR / "train.sbatch").read_text()
    assert BODY_MARKER in text
    assert text[text.index(BODY_MARKER):].rstrip("\n") == train_body().rstrip("\n")
    h = header_dict(text)
    assert h["signal"].startswith("B:USR1@") and h["requeue"] is True


# ---------------------------------------------------------------------------------- CLI errors
def test_cli_dry_run_writes_nothing_and_resolves_recipe(tmp_path):
    run_dir = tmp_path / "run"
    rc, out, err = ling_slurm("submit", QUICKSTART, "--nodes", "2", "--gpus-per-node", "0", "--procs-per-node", "1",
                              "--run-dir", run_dir, "--env", "FOO=bar", "training.train_iters=30", "--dry-run",
                              cwd=tmp_path)
    assert rc == 0, err
    assert not run_dir.exists()
    h = header_dict(out)
    assert h["nodes"] == "2" and h["ntasks-per-node"] == "1" and "gpus-per-node" not in h
    s = settings(out)
    assert s["RUN_DIR"] == str(run_dir) and s["RECIPE"] == str(run_dir / "job.recipe.yaml")
    assert "export FOO=bar" in out


def test_cli_submit_without_sbatch_is_one_line(tmp_path):
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + ":/nonexistent")  # python yes, sbatch no
    rc, out, err = ling_slurm("submit", QUICKSTART, "--gpus-per-node", "0", "--procs-per-node", "2",
                              "--run-dir", tmp_path / "run", cwd=tmp_path, env=env)
    assert rc == 2 and err.startswith("error: sbatch not found") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,needle", [
    (["missing.yaml", "--gpus-per-node", "0", "--procs-per-node", "2"], "missing.yaml"),
    ([QUICKSTART, "--gpus-per-node", "0", "--procs-per-node", "2", "training.no_such_field=1"], "no_such_field"),
    # parallel sizes that do not fit nodes x processes: checked with the recipe's own validation
    ([QUICKSTART, "--nodes", "1", "--gpus-per-node", "0", "--procs-per-node", "3", "parallel.tp=2"], "parallel"),
    ([QUICKSTART, "--gpus-per-node", "0"], "--procs-per-node"),
    ([QUICKSTART, "--gpus-per-node", "0", "--procs-per-node", "2", "--env", "1BAD=x"], "--env"),
    ([QUICKSTART, "--gpus-per-node", "0", "--procs-per-node", "2", "--no-such-flag"], "--no-such-flag"),
])
def test_cli_bad_input_is_one_line(args, needle, tmp_path):
    rc, out, err = ling_slurm("submit", *args, "--dry-run", cwd=tmp_path)
    assert rc == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert out == ""


def test_cli_existing_run_dir_is_not_overwritten(tmp_path):
    (tmp_path / "run").mkdir()
    rc, _, err = ling_slurm("submit", QUICKSTART, "--gpus-per-node", "0", "--procs-per-node", "2",
                            "--run-dir", tmp_path / "run", "--dry-run", cwd=tmp_path)
    assert rc == 2 and "already exists" in err and "ling-slurm resubmit" in err


def test_recipe_run_dir_becomes_the_job_run_dir(tmp_path):
    recipe = tmp_path / "r.yaml"
    text = Path(_builtin(QUICKSTART)).read_text()
    data = yaml.safe_load(text) or {}
    data["run_dir"] = str(tmp_path / "from-recipe")
    recipe.write_text(yaml.safe_dump(data))
    rc, out, err = ling_slurm("submit", recipe, "--gpus-per-node", "0", "--procs-per-node", "2", "--dry-run",
                              cwd=tmp_path)
    assert rc == 0, err
    assert settings(out)["RUN_DIR"] == str(tmp_path / "from-recipe")


def _builtin(name):
    from megatron_ling.training.recipe import builtin_recipe_path

    return builtin_recipe_path(name)


def test_status_of_bad_job_argument_is_one_line(tmp_path):
    rc, _, err = ling_slurm("status", "not-a-job", cwd=tmp_path)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert re.search(r"neither a job id nor a run directory", err)


# ----------------------------------------------------------------------------------- reaper
ORPHAN_MAKER = """
import os, sys, time
pid = os.fork()
if pid == 0:                      # the leftover: outlives its parent, holds the same stdout
    time.sleep(300)
    os._exit(0)
print(pid, flush=True)
os._exit(3)                       # the 'trainer' dies without cleaning up
"""


def test_reaper_ends_what_a_dead_command_left_behind():
    """Without the reaper the grandchild would keep the task's stdout open for 300 s (a hung step)."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "megatron_ling.launch.reaper", "--", sys.executable, "-c",
                           ORPHAN_MAKER], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr  # the command's own status
    orphan = int(proc.stdout.split()[0])
    assert "left behind" in proc.stderr
    assert not os.path.exists(f"/proc/{orphan}") or "State:\tZ" in Path(f"/proc/{orphan}/status").read_text()
    assert time.time() - t0 < 30


def test_reaper_passes_signal_exit_status():
    proc = subprocess.run([sys.executable, "-m", "megatron_ling.launch.reaper", "--", "bash", "-c", "kill -9 $$"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + 9
