"""Render the sbatch script of a training job: #SBATCH header + settings + the fixed launch logic.

The launch logic (rendezvous, stop requests, requeue decision) is one file,
`templates/train_body.sh`, shared verbatim by every rendered job and by the hand-editable
`slurm/train.sbatch`; only the header and the settings block differ from job to job.
"""
from __future__ import annotations

import shlex
from datetime import datetime, timezone
from importlib import resources
from typing import List, Optional, Sequence

from megatron_ling.launch.spec import SlurmJobSpec
from megatron_ling.version import __version__

BODY_MARKER = "# ==== ling-slurm launch logic"


def train_body() -> str:
    """The launch logic every training job script ends with."""
    return resources.files("megatron_ling.launch").joinpath("templates/train_body.sh").read_text()


def sbatch_options(spec: SlurmJobSpec, run_dir: str, workdir: str) -> List[str]:
    """The `#SBATCH` options, one per line, in the order a reader expects."""
    opts = [f"--job-name={spec.job_name}", f"--nodes={spec.nodes}",
            f"--ntasks-per-node={spec.tasks_per_node}", f"--cpus-per-task={spec.task_cpus}"]
    if not spec.cpu_only:
        opts.append(f"--gpus-per-node={spec.gpus_per_node}")
    for name in ("time", "partition", "account", "qos", "constraint", "mem"):
        val = getattr(spec, name)
        if val is not None:
            opts.append(f"--{name}={val}")
    if spec.exclusive:
        opts.append("--exclusive")
    opts += [
        # one log per job id; a requeued run appends to the same file
        f"--output={run_dir}/logs/slurm-%j.out",
        "--open-mode=append",
        f"--chdir={workdir}",
        # B: = the signal goes to the batch shell, which turns it into the stop file for all nodes
        f"--signal=B:{spec.signal_name}@{spec.signal_seconds}",
        "--requeue",
    ]
    opts += list(spec.extra_sbatch)
    return opts


def _sh_array(values: Sequence[str]) -> str:
    return "(" + " ".join(shlex.quote(v) for v in values) + ")"


def container_args(spec: SlurmJobSpec) -> List[str]:
    """pyxis options added to every srun of the job."""
    args: List[str] = []
    if spec.container_image:
        args.append(f"--container-image={spec.container_image}")
    if spec.container_mounts:
        args.append(f"--container-mounts={spec.container_mounts}")
    if spec.container_workdir:
        args.append(f"--container-workdir={spec.container_workdir}")
    return args


def render_train_script(spec: SlurmJobSpec, run_dir: str, recipe_path: str, overrides: Sequence[str] = (),
                        workdir: Optional[str] = None, source: Optional[str] = None) -> str:
    """The complete batch script. `run_dir`, `recipe_path` and `workdir` should be absolute paths."""
    spec.validate()
    workdir = workdir or run_dir
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [
        "#!/bin/bash",
        f"# Rendered by ling-slurm {__version__} on {now}" + (f" from {source}" if source else "") + ".",
        f"# Run directory: {run_dir} (resolved recipe, provenance, logs/, control/).",
        "# Edit and resubmit with `sbatch` if you like; `ling-slurm resubmit RUN_DIR` does the same.",
    ]
    lines += [f"#SBATCH {opt}" for opt in sbatch_options(spec, run_dir, workdir)]
    lines += [
        "",
        "# ---- settings ----",
        f"RUN_DIR={shlex.quote(run_dir)}",
        f"RECIPE={shlex.quote(recipe_path)}",
        f"OVERRIDES={_sh_array(overrides)}",
        f"LAUNCHER={spec.launcher}",
        f"NNODES={spec.nodes}",
        f"PROCS_PER_NODE={spec.nprocs_per_node}",
        f"CPUS_PER_TASK={spec.task_cpus}",
        f"MAX_RESTARTS={spec.max_restarts}",
        f"PYTHON={shlex.quote(spec.python)}",
        f"ENTRY_MODULE={shlex.quote(spec.entry_module)}",
        f"CONTAINER_ARGS={_sh_array(container_args(spec))}",
        "",
        "# ---- environment (defaults yield to the submitting shell; --env values are fixed) ----",
    ]
    for key, val in spec.env_defaults().items():
        if key not in spec.env:
            lines.append(f"export {key}=\"${{{key}-{_dq(val)}}}\"")
    for key, val in spec.env.items():
        lines.append(f"export {key}={shlex.quote(val)}")
    lines += ["", train_body().rstrip("\n")]
    return "\n".join(lines) + "\n"


def _dq(val: str) -> str:
    """Escape for use inside double quotes in a ${VAR-default} expansion."""
    return val.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`").replace("}", "\\}")


def parse_sbatch_header(script: str) -> List[str]:
    """The `#SBATCH` options of a script, as sbatch reads them (up to the first command line)."""
    opts: List[str] = []
    for line in script.splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#SBATCH"):
            opts.extend(shlex.split(stripped[len("#SBATCH"):]))
        elif stripped and not stripped.startswith("#"):
            break
    return opts
