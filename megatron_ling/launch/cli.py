"""ling-slurm: submit Ling training to Slurm and follow it.

  ling-slurm submit RECIPE.yaml --nodes N --gpus-per-node G [options] [dotted.key=value ...] [--dry-run]
  ling-slurm resubmit RUN_DIR
  ling-slurm status JOB|RUN_DIR
  ling-slurm logs JOB|RUN_DIR [-n LINES] [-f]
  ling-slurm cancel JOB|RUN_DIR [--checkpoint]

Errors are one line, `error: ...`, exit status 2.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from megatron_ling.errors import LingConfigError, cli_main
from megatron_ling.launch import slurmctl
from megatron_ling.launch.spec import SlurmJobSpec, parse_env


def _add_submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML (e.g. megatron_ling/recipes/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, as for ling-train")
    g = p.add_argument_group("resources")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=8, help="0 = CPU run with gloo (needs --procs-per-node)")
    g.add_argument("--procs-per-node", type=int, default=None,
                   help="training processes per node (default: one per GPU)")
    g.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs per Slurm task (default: one per process started by the task)")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--time", help="time limit, e.g. 4:00:00 or 2-00:00:00")
    g.add_argument("--constraint")
    g.add_argument("--mem", help="memory per node, e.g. 0 (all) or 500G")
    g.add_argument("--exclusive", action="store_true")
    g.add_argument("--sbatch", dest="extra_sbatch", action="append", default=[], metavar="--OPTION=VALUE",
                   help="any other sbatch option, repeatable (e.g. --sbatch=--reservation=big)")
    g = p.add_argument_group("launch")
    g.add_argument("--launcher", choices=["torchrun", "srun"], default="torchrun",
                   help="torchrun: one task per node, c10d rendezvous on the first node; "
                        "srun: one task per process, ranks from SLURM_PROCID/LOCALID/NTASKS")
    g.add_argument("--job-name", default=None, help="default: ling-<recipe name>")
    g.add_argument("--run-dir", default=None, help="default: runs/slurm/<job name>-<timestamp>")
    g.add_argument("--env", action="append", default=[], metavar="K=V",
                   help="export K=V in the job (overrides the NCCL/CUDA defaults); repeatable")
    g.add_argument("--python", default=None,
                   help="interpreter on the compute nodes (default: this one; 'python3' with a container)")
    g.add_argument("--entry-module", default="megatron_ling.training.cli",
                   help="module every training process runs with `python -m`")
    g.add_argument("--container-image", help="pyxis: image for every srun")
    g.add_argument("--container-mounts", help="pyxis: SRC:DST[,SRC:DST...]")
    g.add_argument("--container-workdir", help="pyxis: working directory in the container")
    g = p.add_argument_group("preemption")
    g.add_argument("--signal", default="USR1@180",
                   help="warning signal and its lead time before the time limit (default USR1@180)")
    g.add_argument("--max-restarts", type=int, default=3,
                   help="how often a stopped-and-checkpointed job requeues itself (default 3)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the script; submit nothing")


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line too (argparse would print the whole usage first)."""

    def error(self, message):  # noqa: D401
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ling-slurm", description="Run Ling training on Slurm.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_submit_args(sub.add_parser("submit", help="render a run directory and sbatch it"))
    p = sub.add_parser("resubmit", help="submit a run directory again; training resumes from its checkpoint")
    p.add_argument("run_dir")
    p = sub.add_parser("status", help="state of a job (squeue/scontrol, sacct once it is gone)")
    p.add_argument("job", help="job id or run directory")
    p = sub.add_parser("logs", help="print a job's output")
    p.add_argument("job", help="job id or run directory")
    p.add_argument("-n", "--lines", type=int, default=50, help="last N lines (0 = all)")
    p.add_argument("-f", "--follow", action="store_true")
    p = sub.add_parser("cancel", help="cancel a job")
    p.add_argument("job", help="job id or run directory")
    p.add_argument("--checkpoint", action="store_true",
                   help="let the trainer finish its step and save a checkpoint first; no requeue")
    return parser


def spec_from_args(args: argparse.Namespace) -> SlurmJobSpec:
    job_name = args.job_name or "ling-" + Path(args.recipe).stem
    python = args.python or ("python3" if args.container_image else sys.executable)
    return SlurmJobSpec(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, procs_per_node=args.procs_per_node,
        launcher=args.launcher, job_name=job_name, time=args.time, partition=args.partition,
        account=args.account, qos=args.qos, constraint=args.constraint, exclusive=args.exclusive,
        mem=args.mem, cpus_per_task=args.cpus_per_task, container_image=args.container_image,
        container_mounts=args.container_mounts, container_workdir=args.container_workdir,
        env=parse_env(args.env), signal=args.signal, max_restarts=args.max_restarts, python=python,
        entry_module=args.entry_module, extra_sbatch=list(args.extra_sbatch),
    ).validate()


# ---------------------------------------------------------------- job lookup
def _resolve_job(arg: str):
    """JOB|RUN_DIR -> (job id, run dir or None)."""
    from megatron_ling.launch.submit import JOB_SCRIPT, job_ids

    if os.path.isdir(arg):
        ids = job_ids(Path(arg))
        if not ids:
            raise LingConfigError(f"{arg} has no submitted job (no jobs.txt): give a run dir made by ling-slurm submit")
        return ids[-1], Path(arg).absolute()
    if not arg.split("_")[0].isdigit():
        raise LingConfigError(f"{arg!r} is neither a job id nor a run directory")
    info = slurmctl.show_job(arg)
    run_dir = None
    if info and info.get("Command"):
        cand = Path(info["Command"].split()[0]).parent
        if (cand / JOB_SCRIPT).exists():
            run_dir = cand
    return arg, run_dir


def _log_path(job: str, run_dir: Optional[Path]) -> Optional[Path]:
    info = slurmctl.show_job(job)
    if info and info.get("StdOut"):
        return Path(info["StdOut"])
    if run_dir is not None:
        return run_dir / "logs" / f"slurm-{job}.out"
    return None


def _last_exit_record(run_dir: Path, job: str) -> Optional[str]:
    recs = sorted((run_dir / "control").glob(f"exit-{job}-*.json"),
                  key=lambda p: int(p.stem.rsplit("-", 1)[-1]) if p.stem.rsplit("-", 1)[-1].isdigit() else -1)
    if not recs:
        return None
    return f"{recs[-1].name}: {recs[-1].read_text().strip()}"


# ---------------------------------------------------------------- commands
def cmd_submit(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from megatron_ling.launch.submit import submit

    spec = spec_from_args(args)
    sub = submit(spec, args.recipe, args.overrides, run_dir=args.run_dir, dry_run=args.dry_run,
                 argv=["ling-slurm", *argv])
    if args.dry_run:
        sys.stdout.write(sub.script)
        print(f"# dry run: nothing written or submitted (run dir would be {sub.run_dir})", file=sys.stderr)
        return 0
    print(f"submitted job {sub.job_id}")
    print(f"run dir: {sub.run_dir}")
    print(f"log: {sub.log_path}")
    return 0


def cmd_resubmit(args: argparse.Namespace) -> int:
    from megatron_ling.launch.submit import resubmit

    sub = resubmit(args.run_dir)
    print(f"submitted job {sub.job_id}")
    print(f"run dir: {sub.run_dir}")
    print(f"log: {sub.log_path}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    job, run_dir = _resolve_job(args.job)
    info = slurmctl.show_job(job)
    if info is not None:
        print(f"job {job} {info.get('JobName', '?')}: {info.get('JobState', '?')}"
              f" (reason {info.get('Reason', 'None')}) restarts={info.get('Restarts', '0')}"
              f" nodes={info.get('NodeList', '?')} elapsed={info.get('RunTime', '?')}"
              f" limit={info.get('TimeLimit', '?')} exit={info.get('ExitCode', '?')}")
    else:
        rows = slurmctl.accounting(job)
        if not rows:
            raise slurmctl.SlurmError(f"job {job} is unknown to slurmctld and accounting (sacct)")
        for r in rows:
            print(f"job {r['JobID']} {r['JobName']}: {r['State']} exit={r['ExitCode']} nodes={r['NodeList']}"
                  f" elapsed={r['Elapsed']} start={r['Start']} end={r['End']}")
    if run_dir is not None:
        print(f"run dir: {run_dir}")
        rec = _last_exit_record(run_dir, job)
        if rec:
            print(f"last trainer exit: {rec}")
    log = _log_path(job, run_dir)
    if log is not None:
        print(f"log: {log}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    job, run_dir = _resolve_job(args.job)
    log = _log_path(job, run_dir)
    if log is None or not log.exists():
        raise slurmctl.SlurmError(f"no log for job {job} yet" + (f" ({log})" if log else "") +
                                  ": it may still be pending (ling-slurm status)")
    if args.follow:
        cmd = ["tail", "-F", "-n", str(args.lines) if args.lines > 0 else "+1", str(log)]
        try:
            return subprocess.call(cmd)
        except KeyboardInterrupt:
            return 0
    lines = log.read_text(errors="replace").splitlines()
    if args.lines > 0:
        lines = lines[-args.lines:]
    print("\n".join(lines))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    job, run_dir = _resolve_job(args.job)
    if args.checkpoint:
        info = slurmctl.show_job(job)
        if info is None or info.get("JobState") != "RUNNING" or run_dir is None:
            raise LingConfigError(f"--checkpoint needs a RUNNING ling-slurm job; job {job} is "
                                  f"{(info or {}).get('JobState', 'unknown')}: use plain `ling-slurm cancel {job}`")
        (run_dir / "control" / f"no-requeue-{job}").touch()
        slurmctl.scancel(job, signal="USR1", batch_only=True)
        print(f"job {job}: asked to checkpoint and stop (no requeue); follow with ling-slurm logs -f {job}")
        return 0
    slurmctl.scancel(job)
    print(f"job {job}: cancelled")
    return 0


@cli_main(errors=(slurmctl.SlurmError,))
def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `ling-slurm status J | head -1` ends quietly
    parser = build_parser()
    # Overrides may come before or after options (argparse alone only takes them in one block).
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or args.command != "submit" or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if args.command == "submit":
        return cmd_submit(args, argv)
    if args.command == "resubmit":
        return cmd_resubmit(args)
    if args.command == "status":
        return cmd_status(args)
    if args.command == "logs":
        return cmd_logs(args)
    return cmd_cancel(args)


if __name__ == "__main__":
    sys.exit(main())
