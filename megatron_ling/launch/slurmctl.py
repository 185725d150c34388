"""Thin wrappers over the Slurm commands (sbatch, scontrol, squeue, sacct, scancel).

Every failure becomes a `SlurmError` with one line: the command and Slurm's own reason.
"""
from __future__ import annotations

import shutil
import subprocess
from typing import Dict, List, Optional, Sequence


class SlurmError(RuntimeError):
    """A Slurm command is missing or refused the request. The message is one line."""


def _one_line(text: str) -> str:
    """Slurm's reason, without the 'sbatch: error:' prefixes, on one line."""
    parts = []
    for line in text.strip().splitlines():
        line = line.strip()
        for prefix in ("sbatch: error:", "scontrol: error:", "scancel: error:", "squeue: error:",
                       "sacct: error:", "srun: error:", "error:"):
            if line.lower().startswith(prefix):
                line = line[len(prefix):].strip()
        if line and line not in parts:
            parts.append(line)
    return "; ".join(parts) or "no message"


def require(cmd: str) -> str:
    path = shutil.which(cmd)
    if path is None:
        raise SlurmError(f"{cmd} not found on PATH: run ling-slurm on a Slurm login node "
                         "(or use --dry-run to only render the script)")
    return path


def run(cmd: Sequence[str], timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
    require(cmd[0])
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{cmd[0]} did not answer within {timeout:.0f}s: is slurmctld reachable (scontrol ping)?")
    if check and proc.returncode != 0:
        raise SlurmError(f"{cmd[0]} failed: {_one_line(proc.stderr or proc.stdout)}")
    return proc


def sbatch(script_path: str, extra: Sequence[str] = ()) -> str:
    """Submit; returns the job id. Rejections (unknown partition, too many resources...) -> SlurmError."""
    require("sbatch")
    proc = run(["sbatch", "--parsable", *extra, script_path], check=False)
    if proc.returncode != 0:
        raise SlurmError(f"sbatch rejected the job: {_one_line(proc.stderr or proc.stdout)}")
    # --parsable prints "jobid" or "jobid;cluster"
    job_id = proc.stdout.strip().splitlines()[-1].split(";")[0].strip()
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed no job id: {proc.stdout.strip()!r}")
    return job_id


def show_job(job_id: str) -> Optional[Dict[str, str]]:
    """`scontrol show job -o` as a dict, or None once slurmctld has forgotten the job."""
    proc = run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    return parse_scontrol_record(proc.stdout.strip().splitlines()[0])


def parse_scontrol_record(line: str) -> Dict[str, str]:
    """'Key=Value Key2=Value with spaces ...' -> dict. Values may hold spaces (Command=..., Reason=...),
    so a new key starts only at ' Name=' where Name looks like a scontrol key."""
    import re

    out: Dict[str, str] = {}
    matches = list(re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=", line))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(line)
        out[m.group(1)] = line[m.end():end].strip()
    return out


def accounting(job_id: str) -> Optional[List[Dict[str, str]]]:
    """The job's records from sacct (slurmdbd) or, without a database, the job completion log
    (`sacct -c`); None when neither knows it."""
    fields = "JobID,JobName,State,ExitCode,Elapsed,NNodes,NodeList,Start,End"
    if shutil.which("sacct") is None:
        return None
    for extra in ([], ["-c"]):
        proc = run(["sacct", *extra, "-X", "-P", "-n", "-o", fields, "-j", str(job_id)], check=False)
        if proc.returncode != 0 or "disabled" in (proc.stderr + proc.stdout).lower():
            continue
        rows = [dict(zip(fields.split(","), line.split("|"))) for line in proc.stdout.strip().splitlines() if line]
        rows = [r for r in rows if r.get("JobID", "").split("_")[0] == str(job_id)]
        if rows:
            return rows
    return None


def scancel(job_id: str, signal: Optional[str] = None, batch_only: bool = False) -> None:
    cmd = ["scancel"]
    if signal:
        cmd += ["--signal", signal]
    if batch_only:
        cmd.append("--batch")
    run(cmd + [str(job_id)])
