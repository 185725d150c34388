"""`ling-slurm submit`: validate, render a run directory, sbatch it.

A run directory holds everything needed to know what ran and to run it again:

    job.sbatch          the batch script (header + settings + fixed launch logic)
    job.recipe.yaml     the resolved recipe the job trains with (overrides applied, run_dir = this
                        directory); the trainer also writes its own record, recipe.yaml
    recipe.source.yaml  the recipe file as given
    provenance.json     package version, git commit, command line, job spec, submit host/time
    pip-freeze.txt      the submitting environment
    jobs.txt            one line per sbatch: job id and time
    logs/slurm-ID.out   job output (a requeued job appends to its file)
    control/            stop requests and the trainer's exit records (see templates/train_body.sh)
"""
from __future__ import annotations

import dataclasses
import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import yaml

from megatron_ling.errors import LingConfigError
from megatron_ling.launch import slurmctl
from megatron_ling.launch.render import render_train_script
from megatron_ling.launch.spec import SlurmJobSpec
from megatron_ling.version import __version__

JOB_SCRIPT = "job.sbatch"
JOB_RECIPE = "job.recipe.yaml"


@dataclasses.dataclass
class Submission:
    run_dir: Path
    script: str
    job_id: Optional[str] = None

    @property
    def log_path(self) -> Optional[Path]:
        return self.run_dir / "logs" / f"slurm-{self.job_id}.out" if self.job_id else None


def default_run_dir(job_name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / "slurm" / f"{job_name}-{stamp}"


def locate_recipe(recipe: str) -> str:
    """A recipe file, or the name of a built-in recipe (e.g. 'quickstart')."""
    if os.path.isfile(recipe):
        return recipe
    from megatron_ling.training.recipe import builtin_recipe_path

    builtin = builtin_recipe_path(recipe)
    if os.path.isfile(builtin):
        return builtin
    raise LingConfigError(f"recipe {recipe!r} does not exist: give the path of a recipe YAML file "
                          "or the name of a built-in recipe such as quickstart")


def explicit_run_dir(recipe_file: str, overrides: Sequence[str]) -> Optional[str]:
    """The run_dir the user set (last override wins over the file), or None."""
    for text in reversed(list(overrides)):
        key, sep, value = text.partition("=")
        if sep and key.strip() == "run_dir":
            return value.strip()
    try:
        with open(recipe_file) as f:
            raw = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None  # load_recipe reports it properly
    value = raw.get("run_dir") if isinstance(raw, dict) else None
    return str(value) if value else None


def resolve_recipe(recipe_file: str, overrides: Sequence[str], world_size: int, run_dir: Path):
    """Load the recipe with its overrides and run_dir = the job's run directory (so checkpoints,
    metrics and TensorBoard files default to it and a requeued job finds its checkpoints again),
    then validate it for `world_size` processes. Returns (recipe, overrides applied)."""
    from megatron_ling.training.recipe import load_recipe  # heavy import: only when submitting

    applied = [o for o in overrides if o.partition("=")[0].strip() != "run_dir"] + [f"run_dir={run_dir}"]
    recipe = load_recipe(recipe_file, applied)
    recipe.validate(world_size)
    return recipe, applied


def git_commit(path: Path) -> dict:
    """Commit and dirty flag of the git checkout holding `path` ({} when it is not one)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=20)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {}
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        return {}


def pip_freeze() -> str:
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True, timeout=120)
        if proc.returncode == 0:
            return proc.stdout
    except (OSError, subprocess.TimeoutExpired):
        pass
    # pip missing from the environment: the installed distributions, in the same format
    from importlib import metadata

    return "".join(sorted(f"{d.metadata['Name']}=={d.version}\n" for d in metadata.distributions()))


def provenance(spec: SlurmJobSpec, recipe_path: str, overrides: Sequence[str], argv: Sequence[str]) -> dict:
    import megatron_ling

    pkg_dir = Path(megatron_ling.__file__).resolve().parent
    return {
        "megatron_ling_version": __version__,
        "megatron_ling_path": str(pkg_dir),
        "git": git_commit(pkg_dir),
        "recipe": os.path.abspath(recipe_path),
        "overrides": list(overrides),
        "spec": dataclasses.asdict(spec),
        "world_size": spec.world_size,
        "command": list(argv),
        "cwd": os.getcwd(),
        "python": sys.executable,
        "host": socket.gethostname(),
        "user": getpass.getuser(),
        "submitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def prepare(spec: SlurmJobSpec, recipe_path: str, overrides: Sequence[str] = (), run_dir: Optional[str] = None,
            argv: Sequence[str] = ()) -> Tuple[Submission, dict]:
    """Validate everything and render the script; writes nothing. Returns the submission and the
    files of its run directory (name -> text)."""
    spec.validate()
    recipe_file = locate_recipe(recipe_path)
    run_path = Path(run_dir or explicit_run_dir(recipe_file, overrides) or default_run_dir(spec.job_name)).absolute()
    if run_path.exists():
        raise LingConfigError(
            f"--run-dir {run_path} already exists: continue that run with `ling-slurm resubmit {run_path}` "
            "or choose a new --run-dir")
    recipe, applied = resolve_recipe(recipe_file, overrides, spec.world_size, run_path)
    script = render_train_script(spec, str(run_path), str(run_path / JOB_RECIPE), (),
                                 workdir=os.getcwd(), source=os.path.abspath(recipe_file))
    files = {
        JOB_SCRIPT: script,
        JOB_RECIPE: recipe.to_yaml(),
        "recipe.source.yaml": Path(recipe_file).read_text(),
        "provenance.json": json.dumps(provenance(spec, recipe_file, applied, argv), indent=2) + "\n",
    }
    return Submission(run_path, script), files


def write_run_dir(sub: Submission, files: dict) -> None:
    """Write into a temporary sibling, then rename: a run directory is complete or absent."""
    tmp = sub.run_dir.with_name(f".{sub.run_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "logs").mkdir(parents=True)
    (tmp / "control").mkdir()
    for name, text in files.items():
        (tmp / name).write_text(text)
    (tmp / "pip-freeze.txt").write_text(pip_freeze())
    os.chmod(tmp / JOB_SCRIPT, 0o755)
    tmp.rename(sub.run_dir)


def record_job(run_dir: Path, job_id: str) -> None:
    with open(run_dir / "jobs.txt", "a") as f:
        f.write(f"{job_id} {datetime.now(timezone.utc).isoformat(timespec='seconds')}\n")


def job_ids(run_dir: Path) -> List[str]:
    path = Path(run_dir) / "jobs.txt"
    if not path.exists():
        return []
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def submit(spec: SlurmJobSpec, recipe_path: str, overrides: Sequence[str] = (), run_dir: Optional[str] = None,
           dry_run: bool = False, argv: Sequence[str] = ()) -> Submission:
    """Validate, render into the run directory and sbatch. With dry_run, only validate and render."""
    sub, files = prepare(spec, recipe_path, overrides, run_dir, argv)
    if dry_run:
        return sub
    slurmctl.require("sbatch")
    sub.run_dir.parent.mkdir(parents=True, exist_ok=True)
    write_run_dir(sub, files)
    try:
        sub.job_id = slurmctl.sbatch(str(sub.run_dir / JOB_SCRIPT))
    except slurmctl.SlurmError:
        shutil.rmtree(sub.run_dir, ignore_errors=True)  # nothing ran: leave no half-made run behind
        raise
    record_job(sub.run_dir, sub.job_id)
    return sub


def resubmit(run_dir: str) -> Submission:
    """Submit a run directory's script again (after a failure or used-up restarts); the trainer
    resumes from the last complete checkpoint."""
    path = Path(run_dir).absolute()
    script = path / JOB_SCRIPT
    if not script.is_file():
        raise LingConfigError(f"{path} is not a ling-slurm run directory (no {JOB_SCRIPT}): give the run dir "
                              "printed by `ling-slurm submit`")
    for job in job_ids(path):
        info = slurmctl.show_job(job)
        if info and info.get("JobState") in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "SUSPENDED",
                                             "COMPLETING", "REQUEUE_HOLD", "REQUEUE_FED"):
            raise LingConfigError(f"job {job} of {path} is still {info['JobState']}: wait for it or "
                                  f"`ling-slurm cancel {job}` first")
    sub = Submission(path, script.read_text())
    sub.job_id = slurmctl.sbatch(str(script))
    record_job(path, sub.job_id)
    return sub
