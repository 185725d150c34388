"""What a Slurm training job asks for: one dataclass, validated before anything is rendered.

`SlurmJobSpec` is the single source of truth for `ling-slurm submit`; the CLI only fills it in.
`validate()` raises `LingConfigError` with one line naming the option and the fix, so a bad
request never reaches sbatch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from megatron_ling.errors import LingConfigError

LAUNCHERS = ("torchrun", "srun")

# Defaults a cluster user expects for Megatron on GPUs. Rendered as `export K=${K:-default}` so the
# submitting shell (sbatch exports it) or `--env K=V` wins.
GPU_ENV_DEFAULTS: Dict[str, str] = {
    # Megatron's TP/SP comm-compute overlap relies on one hardware queue per device.
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    # A failed or hung collective tears the job down instead of blocking until the time limit.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    # Megatron's recommendation with overlapped communication: free NCCL buffers eagerly.
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    "NCCL_DEBUG": "WARN",
    "PYTHONUNBUFFERED": "1",
}
# CPU (gloo) runs: one thread per process unless the user says otherwise, no CUDA lookups.
CPU_ENV_DEFAULTS: Dict[str, str] = {
    "OMP_NUM_THREADS": "1",
    "CUDA_VISIBLE_DEVICES": "",
    "PYTHONUNBUFFERED": "1",
}

_SIGNALS = ("USR1", "USR2", "TERM", "INT", "HUP", "URG")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_JOB_NAME = re.compile(r"^[A-Za-z0-9_.+-]{1,128}$")
# Slurm --time: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_slurm_time(value: str) -> int:
    """Seconds in a Slurm --time string; raises LingConfigError on anything sbatch would refuse."""
    m = _TIME.match(value.strip())
    if not m:
        raise LingConfigError(
            f"--time {value!r} is not a Slurm time: use MINUTES, HH:MM:SS or D-HH:MM:SS (e.g. 4:00:00)")
    days, a, b, c = m.groups()
    a = int(a)
    if days is not None:  # D-H[:M[:S]]
        secs = int(days) * 86400 + a * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # H:M:S
        secs = a * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # M:S
        secs = a * 60 + int(b)
    else:  # M
        secs = a * 60
    if secs <= 0:
        raise LingConfigError(f"--time {value!r} is zero: give the job a positive time limit")
    return secs


def parse_signal(value: str):
    """'USR1@180' -> ('USR1', 180). The job gets SIG this many seconds before its time limit."""
    m = re.match(r"^(?:SIG)?([A-Z0-9]+)@(\d+)$", value.strip().upper())
    if not m or m.group(1) not in _SIGNALS:
        raise LingConfigError(
            f"--signal {value!r}: use SIG@SECONDS with SIG one of {'/'.join(_SIGNALS)} (e.g. USR1@180)")
    secs = int(m.group(2))
    if not 0 < secs <= 65535:  # Slurm stores the lead time in 16 bits
        raise LingConfigError(f"--signal {value!r}: the lead time must be 1..65535 seconds")
    return m.group(1), secs


def parse_env(items: List[str]) -> Dict[str, str]:
    """['K=V', ...] -> {K: V}, rejecting names a shell cannot export."""
    env: Dict[str, str] = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not _ENV_KEY.match(key):
            raise LingConfigError(f"--env {item!r}: use --env NAME=VALUE with NAME a valid shell variable name")
        env[key] = val
    return env


@dataclass
class SlurmJobSpec:
    """Everything `ling-slurm submit` puts into the batch script, besides the recipe itself."""

    nodes: int = 1
    gpus_per_node: int = 8
    # Processes per node; defaults to gpus_per_node. Required with gpus_per_node == 0 (CPU/gloo runs).
    procs_per_node: Optional[int] = None
    launcher: str = "torchrun"
    job_name: str = "ling"
    time: Optional[str] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclusive: bool = False
    mem: Optional[str] = None
    cpus_per_task: Optional[int] = None
    container_image: Optional[str] = None
    container_mounts: Optional[str] = None
    container_workdir: Optional[str] = None
    env: Dict[str, str] = field(default_factory=dict)
    signal: str = "USR1@180"
    max_restarts: int = 3
    # Interpreter on the compute nodes (inside the container when one is used).
    python: str = "python3"
    # Module run by every training process; `python -m MODULE --config RECIPE overrides...`.
    entry_module: str = "megatron_ling.training.cli"
    # Raw extra `#SBATCH` options for what the flags above do not cover (e.g. "--reservation=x").
    extra_sbatch: List[str] = field(default_factory=list)

    # ------------------------------------------------------------------ derived
    @property
    def cpu_only(self) -> bool:
        return self.gpus_per_node == 0

    @property
    def nprocs_per_node(self) -> int:
        return self.procs_per_node if self.procs_per_node is not None else self.gpus_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.nprocs_per_node

    @property
    def tasks_per_node(self) -> int:
        """Slurm tasks per node: one torchrun agent per node, or one task per process with srun."""
        return 1 if self.launcher == "torchrun" else self.nprocs_per_node

    @property
    def task_cpus(self) -> int:
        """CPUs per Slurm task. torchrun needs at least one per worker it starts on the node
        (Slurm's default of 1 CPU per task would pin all of a node's workers to one core)."""
        if self.cpus_per_task is not None:
            return self.cpus_per_task
        return self.nprocs_per_node if self.launcher == "torchrun" else 1

    @property
    def signal_name(self) -> str:
        return parse_signal(self.signal)[0]

    @property
    def signal_seconds(self) -> int:
        return parse_signal(self.signal)[1]

    def env_defaults(self) -> Dict[str, str]:
        return dict(CPU_ENV_DEFAULTS if self.cpu_only else GPU_ENV_DEFAULTS)

    # ------------------------------------------------------------------ checks
    def validate(self) -> "SlurmJobSpec":
        if self.nodes < 1:
            raise LingConfigError(f"--nodes {self.nodes}: a job needs at least 1 node")
        if self.gpus_per_node < 0:
            raise LingConfigError(f"--gpus-per-node {self.gpus_per_node}: use 0 for CPU runs or a positive count")
        if self.launcher not in LAUNCHERS:
            raise LingConfigError(f"--launcher {self.launcher!r}: use one of {', '.join(LAUNCHERS)}")
        if self.cpu_only:
            if self.procs_per_node is None:
                raise LingConfigError(
                    "--gpus-per-node 0 (CPU run) needs --procs-per-node K: the number of gloo processes per node")
        elif self.procs_per_node is not None and self.procs_per_node != self.gpus_per_node:
            raise LingConfigError(
                f"--procs-per-node {self.procs_per_node} differs from --gpus-per-node {self.gpus_per_node}: "
                "GPU runs start one process per GPU; drop --procs-per-node")
        if self.nprocs_per_node < 1:
            raise LingConfigError(f"--procs-per-node {self.procs_per_node}: must be at least 1")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise LingConfigError(f"--cpus-per-task {self.cpus_per_task}: must be at least 1")
        if not _JOB_NAME.match(self.job_name):
            raise LingConfigError(
                f"--job-name {self.job_name!r}: use letters, digits and _.+- only (at most 128 characters)")
        _, lead = parse_signal(self.signal)
        if self.time is not None:
            limit = parse_slurm_time(self.time)
            if lead >= limit:
                raise LingConfigError(
                    f"--signal {self.signal}: the warning comes {lead}s before the limit but --time {self.time} is "
                    f"only {limit}s; lower the lead time or raise --time")
        if self.max_restarts < 0:
            raise LingConfigError(f"--max-restarts {self.max_restarts}: use 0 (never requeue) or more")
        if (self.container_mounts or self.container_workdir) and not self.container_image:
            raise LingConfigError("--container-mounts/--container-workdir need --container-image (pyxis)")
        for key in self.env:
            if not _ENV_KEY.match(key):
                raise LingConfigError(f"--env {key!r}: not a valid shell variable name")
        for opt in self.extra_sbatch:
            if not opt.startswith("--") or "\n" in opt:
                raise LingConfigError(f"--sbatch {opt!r}: give one long sbatch option such as --reservation=NAME")
        for name in ("partition", "account", "qos", "constraint", "mem", "time", "container_image",
                     "container_mounts", "container_workdir", "python", "entry_module"):
            val = getattr(self, name)
            if val is not None and (not str(val).strip() or "\n" in str(val)):
                raise LingConfigError(f"--{name.replace('_', '-')} {val!r}: must be a non-empty single line")
        return self
