"""Plan / partition / execute: the one mechanism that runs a conversion (``to-hf``, ``from-hf``,
``ling-merge``) as independent *units* on worker processes and nodes.

A :class:`Job` is planned completely before anything runs: its ``units`` (each writes its own output
files, e.g. one safetensors shard or one ``.distcp`` file) and their costs (bytes). Then:

* ``partition`` splits the units between ranks (nodes / Slurm array tasks) deterministically, by
  cost (longest first onto the least loaded rank), so every rank computes the same split;
* ``execute`` runs this rank's units on ``workers`` workers: this process and ``workers - 1``
  started ones (fresh interpreters: a child imports only the job's module - torch and the
  converter, never megatron), which take the units longest first as they become free, writing
  their files into the staging directory; a unit is *done* when its completion
  marker (``units/<i>.json``: what ``finalize`` needs + the files' sizes) is written, atomically,
  after its files are fsynced;
* when every unit of the plan has its marker (the rank that finishes last sees this), that rank
  calls ``job.finalize`` (index, metadata, config: written last) and renames the staging output onto
  ``OUT`` in one ``os.rename``.

Staging: with one rank a fresh hidden temp dir next to ``OUT``, removed on any failure (nothing is
left); with several ranks ``.<OUT>.staging/`` next to ``OUT``, kept after a failure so that a rerun
(of any ranks) redoes only the units without a valid marker. ``plan.json`` there holds the plan's
fingerprint: a staging dir of a different conversion is refused, not mixed in.

A failed unit (exception or a killed worker) stops the other workers and fails the command.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import socket
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from megatron_ling.convert.common import check_output, progress
from megatron_ling.errors import LingConfigError

PLAN = "plan.json"
UNITS = "units"
OUT = "out"
LOCK = "finalize.lock"


@dataclass(frozen=True)
class Unit:
    name: str  # stable, for messages (e.g. the file it writes)
    cost: int  # bytes it reads or writes: what partition balances


class Job:
    """What a parallel conversion implements. Instances are pickled to the workers (keep them to
    plain data; open files lazily in ``run_unit``)."""

    units: list[Unit]
    inputs: tuple = ()  # the input paths: an output that is or contains one is refused

    def describe(self) -> dict:
        """Everything the output depends on (JSON-able): its hash identifies the plan."""
        raise NotImplementedError

    def run_unit(self, i: int, out_dir: str, report) -> dict:
        """Write unit ``i``'s files into ``out_dir`` (fsynced before returning) and return a JSON-able
        record for ``finalize`` with ``"files"``: the names written. ``report(nbytes)``: progress."""
        raise NotImplementedError

    def finalize(self, out_dir: str, records: list[dict]) -> None:
        """Write what needs every unit (index, metadata, config), ``records`` in unit order."""
        raise NotImplementedError

    def verify_inputs(self) -> None:
        """Check the inputs' integrity (LingConfigError when one is corrupt). ``execute`` runs it
        beside the units where a failure discards everything they wrote (one rank), else first."""


@dataclass
class ExecResult:
    finalized: bool  # the output is complete at OUT
    ran: list[int]  # units this call converted
    skipped: list[int]  # units of this rank already done (a rerun)
    missing: int | None  # units of the plan without a marker (other ranks') when not finalized; None: rank had none
    seconds: float
    peak_rss: dict[int, int] = field(default_factory=dict)  # worker pid (this one's too) -> peak RSS bytes
    records: list[dict] = field(default_factory=list)
    # --workers > 1: seconds until every started worker was ready (interpreter, torch, the job),
    # part of ``seconds``; this process's own worker converts meanwhile
    startup_s: float = 0.0


def fingerprint(job: Job) -> str:
    return hashlib.sha256(json.dumps(job.describe(), sort_keys=True).encode()).hexdigest()


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values, else ``RANK``/``WORLD_SIZE``, else a Slurm array (``SLURM_ARRAY_TASK_ID``
    counted from ``SLURM_ARRAY_TASK_MIN``, ``SLURM_ARRAY_TASK_COUNT``), else (0, 1)."""
    env = os.environ
    if rank is None and world_size is None:
        if "WORLD_SIZE" in env or "RANK" in env:
            rank, world_size = env.get("RANK", "0"), env.get("WORLD_SIZE", "1")
            src = "RANK/WORLD_SIZE"
        elif "SLURM_ARRAY_TASK_COUNT" in env:
            rank = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            world_size = env["SLURM_ARRAY_TASK_COUNT"]
            src = "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT"
        else:
            return 0, 1
    else:
        src = "--rank/--world-size"
    try:
        rank, world_size = int(0 if rank is None else rank), int(1 if world_size is None else world_size)
    except ValueError:
        raise LingConfigError(f"{src}: {rank!r}/{world_size!r} are not integers") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise LingConfigError(f"{src}: rank {rank} of world size {world_size} is out of range; "
                              f"need 0 <= rank < world size")
    return rank, world_size


def partition(units: list[Unit], world_size: int) -> list[list[int]]:
    """Disjoint unit indices per rank, balanced by cost (longest first onto the least loaded rank,
    ties by index): the same on every rank, whatever the worker counts."""
    load = [0] * world_size
    parts: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(units)), key=lambda i: (-units[i].cost, i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        parts[r].append(i)
        load[r] += units[i].cost
    return [sorted(p) for p in parts]


# ------------------------------------------------------------------------------ staging
def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _marker(staging: str, i: int) -> str:
    return os.path.join(staging, UNITS, f"{i:06d}.json")


def _done(staging: str, i: int) -> dict | None:
    """The unit's record if its marker exists and every file it names has the size it recorded."""
    try:
        with open(_marker(staging, i)) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    for name, size in m["sizes"].items():
        p = os.path.join(staging, OUT, name)
        if not os.path.isfile(p) or os.path.getsize(p) != size:
            return None
    return m["record"]


def _run_and_mark(job: Job, i: int, staging: str, report) -> dict:
    out = os.path.join(staging, OUT)
    rec = job.run_unit(i, out, report)
    sizes = {n: os.path.getsize(os.path.join(out, n)) for n in rec["files"]}
    _write_json(_marker(staging, i), {"unit": job.units[i].name, "sizes": sizes, "record": rec})
    return rec


def _open_staging(job: Job, out_dir: str, world_size: int) -> tuple[str, bool]:
    """(staging dir, whether it is this call's own temp dir)."""
    parent, base = os.path.split(os.path.abspath(out_dir))
    fp = {"fingerprint": fingerprint(job), "units": [u.name for u in job.units]}
    if world_size == 1:
        staging = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700: as mkdir would, like the multi-rank staging
        own = True
    else:
        staging = os.path.join(parent, f".{base}.staging")
        own = False
        os.makedirs(staging, exist_ok=True)
    os.makedirs(os.path.join(staging, UNITS), exist_ok=True)
    os.makedirs(os.path.join(staging, OUT), exist_ok=True)
    plan = os.path.join(staging, PLAN)
    if not os.path.exists(plan):
        _write_json(plan, fp)
    with open(plan) as f:
        if json.load(f).get("fingerprint") != fp["fingerprint"]:
            raise LingConfigError(f"output: staging directory {staging} belongs to a different conversion "
                                  f"(other input or options); remove it or finish that conversion first")
    return staging, own


# ------------------------------------------------------------------------------ workers
def _run_units(job: Job, first: int, staging: str, take, send) -> int:
    """The loop of every worker, a started interpreter's or this process's own: run ``first``, then
    whatever ``take()`` hands out next (None: no more), reporting through ``send`` (progress, done
    with the peak RSS, or the error). Returns the exit code."""
    i = first
    while i is not None:
        try:
            _run_and_mark(job, i, staging, lambda n: send("progress", n))
        except LingConfigError as e:
            send("error", i, True, str(e))
            return 2
        except BaseException:  # noqa: BLE001 - reported to the parent, which fails the command
            send("error", i, False, traceback.format_exc())
            return 1
        send("done", i, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        i = take()
    return 0


def _worker_main() -> int:
    """A started worker (``python -m megatron_ling.convert.parallel_exec``): reads the parent's
    sys.path (a JSON line) and the pickled (job, staging, first unit) from stdin, then a line with
    the next unit's index after each ``done`` it reports (end of input: no more), and reports JSON
    lines on stdout. Started with subprocess, not multiprocessing: the caller's ``__main__`` is
    never re-imported, and the child imports only the job's module."""
    import pickle
    import sys

    sys.path[:] = json.loads(sys.stdin.buffer.readline())
    job, staging, first = pickle.load(sys.stdin.buffer)  # written by our parent process
    out = sys.stdout

    def send(*msg):
        out.write(json.dumps(msg) + "\n")
        out.flush()

    def take():
        line = sys.stdin.buffer.readline()
        return int(line) if line.strip() else None

    send("ready")
    return _run_units(job, first, staging, take, send)


def _run_pool(job: Job, todo: list[int], staging: str, workers: int, bar,
              poll=lambda: None) -> tuple[dict, float]:
    """Run ``todo`` on ``workers`` workers: this process (on a thread; it has its imports already)
    and ``workers - 1`` started interpreters. Units go out longest first, each to the next worker
    that is free: every started worker gets one with the job and the others follow as units
    finish, so no worker waits through another's start-up (~1-2 s: Python and torch) or idles
    behind a slow share. The first failure (or ``poll()`` raising, checked every 0.1 s) stops the
    others (started workers are killed; this process's own finishes the unit it is in) and is
    raised. Returns (pid -> peak RSS, seconds until every started worker was ready)."""
    import collections
    import pickle
    import queue
    import selectors
    import subprocess
    import sys
    import threading

    order = collections.deque(sorted(todo, key=lambda i: (-job.units[i].cost, i)))
    lock, stop = threading.Lock(), threading.Event()

    def take():
        with lock:
            return order.popleft() if order and not stop.is_set() else None

    own_first = take()
    procs, t0, started, startup = [], time.perf_counter(), 0, 0.0
    sel = selectors.DefaultSelector()
    for _ in range(min(workers, len(todo)) - 1):
        p = subprocess.Popen([sys.executable, "-m", "megatron_ling.convert.parallel_exec"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=False)
        p.stdin.write(json.dumps(sys.path).encode() + b"\n")
        pickle.dump((job, staging, take()), p.stdin)
        p.stdin.flush()
        procs.append(p)
        sel.register(p.stdout, selectors.EVENT_READ, p)
    # this process's worker reports through a queue (read here, so the bar has one writer)
    own_msgs: queue.Queue = queue.Queue()
    own = threading.Thread(target=lambda: own_msgs.put(("exit", _run_units(
        job, own_first, staging, take, lambda *m: own_msgs.put(m)))), name="convert-worker", daemon=True)
    own.start()
    rss, error, open_pipes, own_running, finished = {}, None, len(procs), True, False

    def handle(msg, pid, p=None):
        nonlocal started, startup, error
        if msg[0] == "progress":
            bar.update(msg[1])
        elif msg[0] == "ready":
            started += 1
            if started == len(procs):
                startup = time.perf_counter() - t0
        elif msg[0] == "done":
            rss[pid] = max(rss.get(pid, 0), msg[2])
            if p is not None:  # the next unit, or end of input: no more
                nxt = take()
                try:
                    if nxt is None:
                        p.stdin.close()
                    else:
                        p.stdin.write(f"{nxt}\n".encode())
                        p.stdin.flush()
                except BrokenPipeError:
                    pass  # it died: its exit code is seen when its stdout ends
        elif msg[0] == "error":
            _, i, user_error, text = msg
            error = LingConfigError(text) if user_error else RuntimeError(
                f"conversion worker {pid} failed on unit {i} ({job.units[i].name}):\n{text}")

    try:
        while (open_pipes or own_running) and error is None:
            try:
                poll()
            except Exception as e:  # noqa: BLE001 - raised below, after the workers are stopped
                error = e
                break
            for key, _ in sel.select(timeout=0.1):
                p = key.data
                line = p.stdout.readline()
                if not line:
                    sel.unregister(p.stdout)
                    open_pipes -= 1
                    if p.wait() != 0 and error is None:
                        error = RuntimeError(f"a conversion worker (pid {p.pid}) died with exit code "
                                             f"{p.returncode} (killed? out of memory?)")
                    continue
                handle(json.loads(line), p.pid, p)
            while error is None:
                try:
                    msg = own_msgs.get_nowait()
                except queue.Empty:
                    break
                if msg[0] == "exit":
                    own_running = False
                else:
                    handle(msg, os.getpid())
        finished = error is None
    finally:
        stop.set()  # nothing more is handed out; this process's worker ends after its unit
        for p in procs:
            if p.poll() is None and not finished:
                p.kill()  # a failed unit (or Ctrl-C) fails the command: stop the others now
            if not p.stdin.closed:
                try:
                    p.stdin.close()
                except BrokenPipeError:
                    pass
            p.wait()
            p.stdout.close()
        sel.close()
        own.join()  # before the caller removes the staging dir it writes into
    if error is not None:
        raise error
    return rss, startup


def preflight(out_dir: str, force: bool, inputs: tuple, world_size: int) -> None:
    """The output check a converter makes before planning (a bad ``OUT`` fails before any input
    is read). One rank only: with several, a rank may have no units and start after the others
    have published ``OUT``, so :func:`execute` checks once it knows this rank has units."""
    if world_size == 1:
        check_output(out_dir, force, inputs)


def execute(job: Job, out_dir: str, workers: int = 1, rank: int = 0, world_size: int = 1,
            force: bool = False, show_progress: bool = True, desc: str = "convert") -> ExecResult:
    """Run this rank's share of ``job`` with ``workers`` processes (1: in this process); the rank
    that completes the plan finalizes and renames the output onto ``out_dir``."""
    if workers < 1:
        raise LingConfigError(f"--workers: must be >= 1, got {workers}")
    t0 = time.perf_counter()
    mine = partition(job.units, world_size)[rank]
    if not mine:
        # More ranks than units (a small model on a big array): nothing to do and nothing to touch.
        # This rank may start after the others have published OUT and removed the staging dir, so
        # it must neither refuse the existing output nor re-create a staging dir that nobody cleans.
        return ExecResult(False, [], [], None, time.perf_counter() - t0, {}, [])
    check_output(out_dir, force, job.inputs)
    if world_size > 1:
        # several ranks keep the units they finished after a failure, for a rerun to skip: a unit
        # made from a corrupt input must never be kept, so the inputs are checked before any runs
        job.verify_inputs()
    staging, own = _open_staging(job, out_dir, world_size)
    check = None
    try:
        if own:
            # one rank: the staging dir goes on any failure, so the (CPU-bound) check may run
            # beside the (I/O-bound) units; nothing is finalized or published before it passed,
            # and a failed check stops the units at once (1T: not hours later)
            pool = ThreadPoolExecutor(1, thread_name_prefix="verify-inputs")
            check = pool.submit(job.verify_inputs)
            pool.shutdown(wait=False)
        skipped = [i for i in mine if _done(staging, i) is not None]
        todo = [i for i in mine if i not in skipped]
        bar = progress(sum(job.units[i].cost for i in todo), desc, show_progress)
        def poll():
            if check is not None and check.done():
                check.result()

        if workers == 1:
            for i in todo:
                poll()
                _run_and_mark(job, i, staging, bar.update)
            rss = {os.getpid(): resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024} if todo else {}
            startup = 0.0
        else:
            rss, startup = _run_pool(job, todo, staging, workers, bar, poll)
        bar.close()
        if check is not None:
            check.result()
        records = [_done(staging, i) for i in range(len(job.units))]
        missing = sum(r is None for r in records)
        finalized = missing == 0 and _finalize(job, staging, out_dir, records, force)
    except BaseException as e:
        if own:
            shutil.rmtree(staging, ignore_errors=True)
        if check is not None and isinstance(e, Exception) and check.exception() is not None:
            raise check.exception() from None  # a unit tripped over the corrupt input the check names
        raise
    return ExecResult(finalized, todo, skipped, missing, time.perf_counter() - t0, rss,
                      records if finalized else [], startup)


def _finalize(job: Job, staging: str, out_dir: str, records: list[dict], force: bool) -> bool:
    """Index/config, then one rename. Returns False when another rank holds the finalize lock."""
    lock = os.path.join(staging, LOCK)
    try:
        os.mkdir(lock)
    except FileExistsError:
        return False  # another rank finished at the same time and finalizes
    with open(os.path.join(lock, "owner"), "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
    out = os.path.join(staging, OUT)
    job.finalize(out, records)
    check_output(out_dir, force, job.inputs)
    if os.path.lexists(out_dir):  # --force: replace only now that the new output is complete
        old = staging + ".old"
        os.rename(out_dir, old)
        os.rename(out, out_dir)
        shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
    else:
        os.rename(out, out_dir)
    shutil.rmtree(staging, ignore_errors=True)
    return True


def summary(what: str, r: ExecResult, read: int, written: int, total_units: int) -> str:
    """The one-line report of a converter run (bench/convert.py parses ' in <s> s ', 'peak RSS
    per worker <x> GB' and 'workers started in <s> s')."""
    dt = max(r.seconds, 1e-9)
    s = (f"{what}: {len(r.ran)} of {total_units} units converted here ({len(r.skipped)} already done), "
         f"read {read / 1e9:.3f} GB, wrote {written / 1e9:.3f} GB in {dt:.1f} s "
         f"({written / 1e6 / dt:.0f} MB/s written)")
    if r.peak_rss:
        s += f"; peak RSS per worker {max(r.peak_rss.values()) / 1e9:.2f} GB ({len(r.peak_rss)} workers)"
    if r.startup_s:
        s += f"; workers started in {r.startup_s:.1f} s"
    if r.missing is None:
        s += "; this rank has no units (more ranks than units in the plan)"
    elif not r.finalized:
        s += (f"; output not complete yet: {r.missing} units (other ranks') missing - the rank that "
              f"finishes last writes it" if r.missing else "; another rank is writing the output (finalize lock)")
    return s


if __name__ == "__main__":
    raise SystemExit(_worker_main())
