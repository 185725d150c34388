"""Fast multi-rank (gloo, CPU) test harness: fork N ranks from a process that already imported
torch and megatron-core.

Importing torch + megatron-core costs ~5-12 s per process, more than a tiny multi-rank test itself.
So a *zygote* process is started once (per Python process, lazily): it imports torch, megatron-core
and megatron-ling, never runs a computation, never installs the compat patches, and forks the ranks
of each case. A 2-rank case then costs ~0.5 s of launching instead of ~20 s of torchrun.

Each rank, in its own forked process:
  * gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (a port reserved by the
    harness until rank 0's store server takes it over: megatron_ling.utils.reserve_port),
  * installs the compat patches (``megatron_ling.training.setup.prepare_process``) except those in
    ``compat_exclude`` -- patches are process-global, which is why they never go into the caller,
  * joins a gloo process group with a 60 s timeout (``pg_timeout_s``),
  * runs ``fn(ctx, **kwargs)`` and sends back its (picklable) return value,
  * writes stdout/stderr to a per-rank log whose tail comes back with any failure.

Failure handling, so that a broken layout never hangs CI:
  * a hard per-case ``timeout_s``: hanging ranks get SIGUSR1 (faulthandler dumps every thread's
    stack into the log) and then SIGKILL; :class:`RankTimeout` carries those stacks;
  * when one rank raises, the others get ``grace_s`` to finish before they are killed (they would
    otherwise wait for the failed rank until the process-group timeout);
  * :class:`RankFailure` carries the remote traceback and the log tails of every rank.

Usage (functions must be importable by module path, so that the zygote can unpickle them)::

    from tests.support.harness import run_ranks
    results = run_ranks(my_module.case_fn, world=2, kwargs=dict(tp=2), timeout_s=120)
    # results[r] is what case_fn returned on rank r
"""
from __future__ import annotations

import atexit
import faulthandler
import io
import os
import pickle
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional
from megatron_ling.utils import rendezvous_env, reserve_port

PG_TIMEOUT_S = 60
DEFAULT_TIMEOUT_S = 180


class HarnessError(RuntimeError):
    """The harness itself failed (the zygote died, a result could not be unpickled, ...)."""


class RankFailure(AssertionError):
    """A rank raised (or exited without a result). ``failures`` maps rank -> traceback text."""

    def __init__(self, msg: str, failures: dict, logs: dict):
        super().__init__(msg)
        self.failures = failures
        self.logs = logs


class RankTimeout(RankFailure):
    """A case ran past its hard timeout; the logs hold faulthandler stack dumps of the stuck ranks."""


@dataclass
class RankContext:
    """What a rank function receives as its first argument."""

    rank: int
    world: int
    log_path: str
    info: dict = field(default_factory=dict)

    def log(self, *a) -> None:
        print(f"[rank{self.rank}]", *a, flush=True)


# --------------------------------------------------------------------------- wire format
def _send(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(struct.pack("<Q", len(data)) + data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int, deadline: Optional[float] = None) -> bytes:
    buf = io.BytesIO()
    while n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError
        buf.write(chunk)
        n -= len(chunk)
    return buf.getvalue()


def _recv(fd: int, deadline: Optional[float] = None) -> Any:
    (n,) = struct.unpack("<Q", _read_exact(fd, 8, deadline))
    return pickle.loads(_read_exact(fd, n, deadline))




def _tail(path: str, nbytes: int = 6000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - nbytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


# ------------------------------------------------------------------------------- the rank
def _rank_main(rank: int, world: int, listener, req: dict, log_path: str, wfd: int) -> None:
    """Body of one forked rank. Never returns: always os._exit."""
    code = 1
    try:
        os.setpgid(0, 0)  # so that the harness can end whatever this rank starts
        logf = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(logf, 1)
        os.dup2(logf, 2)
        os.close(logf)
        sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", buffering=0), write_through=True)
        sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", buffering=0), write_through=True)
        faulthandler.enable(file=sys.stderr, all_threads=True)
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
        rendezvous = rendezvous_env(listener, rank)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                          **rendezvous,
                          LING_COMPAT_EXCLUDE=",".join(sorted(req["compat_exclude"])))
        os.environ.update(req.get("env") or {})
        import torch

        torch.set_num_threads(1)
        if req["prepare"]:
            from megatron_ling.training.setup import init_distributed, prepare_process

            prepare_process(cpu_threads=1)
            init_distributed(timeout_s=req["pg_timeout_s"])
        fn, kwargs = pickle.loads(req["call"])
        ctx = RankContext(rank=rank, world=world, log_path=log_path, info=dict(req.get("info") or {}))
        result = fn(ctx, **kwargs)
        payload = ("ok", result)
        code = 0
    except BaseException as e:  # noqa: BLE001 - everything goes back to the caller
        tb = traceback.format_exc()
        try:
            sys.stderr.write(tb)
        except Exception:  # noqa: BLE001
            pass
        payload = ("error", f"{type(e).__name__}: {e}", tb)
    try:
        try:
            _send(wfd, payload)
        except Exception as e:  # noqa: BLE001 - unpicklable result
            _send(wfd, ("error", f"result not picklable: {e!r}", traceback.format_exc()))
            code = 1
        os.close(wfd)
        try:
            import torch

            if torch.distributed.is_available() and torch.distributed.is_initialized() and code == 0:
                torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
        sys.stdout.flush()
        sys.stderr.flush()
        import multiprocessing

        for child in multiprocessing.active_children():  # e.g. a checkpoint writer's Manager
            child.terminate()
            child.join(2)
    finally:
        os._exit(code)


def _complete(buf: bytearray) -> bool:
    return len(buf) >= 8 and len(buf) >= 8 + struct.unpack("<Q", bytes(buf[:8]))[0]


def _decode(buf: bytearray):
    if not _complete(buf):
        return None
    try:
        return pickle.loads(bytes(buf[8:]))
    except Exception as e:  # noqa: BLE001
        return ("error", f"could not unpickle the result: {e!r}", "")


def _run_case(req: dict) -> dict:
    """Fork ``req['world']`` ranks, collect their results; runs inside the zygote (or the caller)."""
    world = req["world"]
    listener = reserve_port()  # closed here once every rank has its copy
    logdir = req.get("log_dir") or tempfile.mkdtemp(prefix="ling_ranks_")
    os.makedirs(logdir, exist_ok=True)
    logs = {r: os.path.join(logdir, f"rank{r}.log") for r in range(world)}
    pids, rfds = {}, {}
    with listener:
        for r in range(world):
            rfd, wfd = os.pipe()
            pid = os.fork()
            if pid == 0:  # child
                os.close(rfd)
                for other in rfds.values():
                    os.close(other)
                _rank_main(r, world, listener, req, logs[r], wfd)
            os.close(wfd)
            pids[r], rfds[r] = pid, rfd
    t0 = time.monotonic()
    deadline = t0 + req["timeout_s"]
    results, bufs, exit_codes = {}, {r: bytearray() for r in range(world)}, {}
    open_fds = {fd: r for r, fd in rfds.items()}
    first_failure_at = None
    order = []  # ranks in the order they failed: the first is usually the cause
    timed_out = False
    while open_fds or len(exit_codes) < world:
        now = time.monotonic()
        limit = deadline
        if first_failure_at is not None:
            limit = min(limit, first_failure_at + req["grace_s"])
        if now >= limit:
            timed_out = first_failure_at is None
            break
        ready = select.select(list(open_fds), [], [], min(0.2, limit - now))[0] if open_fds else []
        if not open_fds:
            time.sleep(min(0.05, max(limit - now, 0)))
        for fd in ready:
            r = open_fds[fd]
            chunk = os.read(fd, 1 << 20)
            if chunk:
                bufs[r] += chunk
            # complete when the length-prefixed payload is in (a process the rank forked, e.g. a
            # checkpoint writer, may hold the pipe open, so EOF is not awaited)
            if not chunk or _complete(bufs[r]):
                del open_fds[fd]
                os.close(fd)
                results[r] = _decode(bufs[r])
                if results[r] is None or results[r][0] != "ok":
                    first_failure_at = first_failure_at or time.monotonic()
                    order.append(r)
        for r, pid in pids.items():
            if r in exit_codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                exit_codes[r] = os.waitstatus_to_exitcode(status)
                fd = rfds[r]
                if fd in open_fds:  # exited: take what it wrote, do not wait for EOF
                    while select.select([fd], [], [], 0)[0]:
                        chunk = os.read(fd, 1 << 20)
                        if not chunk:
                            break
                        bufs[r] += chunk
                    del open_fds[fd]
                    os.close(fd)
                    results[r] = _decode(bufs[r])
                if exit_codes[r] != 0 or results.get(r) is None or results[r][0] != "ok":
                    first_failure_at = first_failure_at or time.monotonic()
                    if r not in order:
                        order.append(r)
    # stragglers: dump their stacks (faulthandler on SIGUSR1), then kill them
    stuck = [r for r in range(world) if r not in exit_codes]
    for r in stuck:
        try:
            os.kill(pids[r], signal.SIGUSR1)
        except ProcessLookupError:
            pass
    if stuck:
        time.sleep(0.5)
    for r in stuck:
        try:
            os.kill(pids[r], signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, status = os.waitpid(pids[r], 0)
        exit_codes[r] = os.waitstatus_to_exitcode(status)
    for fd, r in open_fds.items():  # ranks that died or were killed: whatever they sent
        try:
            while select.select([fd], [], [], 0)[0]:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                bufs[r] += chunk
        except OSError:
            pass
        os.close(fd)
        if _decode(bufs[r]) is not None:
            results[r] = _decode(bufs[r])
    for pid in pids.values():  # anything a rank left behind (each rank leads its process group)
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    results = {r: v for r, v in results.items() if v is not None}
    return dict(results=results, exit_codes=exit_codes, stuck=stuck, timed_out=timed_out, order=order,
                logs=logs, wall_s=time.monotonic() - t0)


# ------------------------------------------------------------------------------ the zygote
_PRELOAD = (
    "torch",
    "torch.distributed",
    "megatron.core",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.gpt.gpt_layer_specs",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.distributed",
    "megatron.core.optimizer",
    "megatron.core.dist_checkpointing",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.transformer.multi_token_prediction",
    "megatron_ling.compat",
    "megatron_ling.training.setup",
    "megatron_ling.training.step",
)


def _zygote_main() -> None:
    """Serve case requests on fds 0 (in) / a dup of 1 (out). stdout is redirected to stderr so that
    nothing but the protocol is written to the pipe."""
    import importlib
    import warnings

    inp = 0
    out = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    warnings.filterwarnings("ignore")
    for m in _PRELOAD:
        importlib.import_module(m)
    from megatron_ling import compat

    _send(out, ("ready", os.getpid()))
    while True:
        try:
            req = _recv(inp)
        except EOFError:
            return
        if req is None:
            return
        try:
            if compat.installed():  # the zygote must stay unpatched; ranks choose their patches
                raise HarnessError(f"compat patches leaked into the zygote: {sorted(compat.installed())}")
            for p in req.get("sys_path") or []:
                if p not in sys.path:
                    sys.path.append(p)
            pickle.loads(req["call"])  # import the function's module here, once, before forking
            resp = ("done", _run_case(req))
        except BaseException as e:  # noqa: BLE001
            resp = ("harness_error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        _send(out, resp)


class Zygote:
    """A pre-imported process that forks the ranks of each case."""

    def __init__(self, startup_timeout_s: float = 300):
        env = dict(os.environ)
        env.setdefault("PYTHONWARNINGS", "ignore")
        env["OMP_NUM_THREADS"] = "1"
        env.pop("LING_COMPAT_EXCLUDE", None)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tests.support.harness import _zygote_main; _zygote_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True)
        try:
            msg = _recv(self.proc.stdout.fileno(), time.monotonic() + startup_timeout_s)
        except (TimeoutError, EOFError) as e:
            self.close()
            raise HarnessError(f"the test zygote did not start ({type(e).__name__})") from None
        assert msg[0] == "ready", msg

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, req: dict) -> dict:
        _send(self.proc.stdin.fileno(), req)
        # the zygote enforces the case timeout itself; this is a backstop if it is wedged
        try:
            resp = _recv(self.proc.stdout.fileno(), time.monotonic() + req["timeout_s"] + req["grace_s"] + 60)
        except (TimeoutError, EOFError) as e:
            self.close()
            raise HarnessError(f"the test zygote stopped answering ({type(e).__name__})") from None
        if resp[0] != "done":
            raise HarnessError(resp[1])
        return resp[1]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except Exception:  # noqa: BLE001
                pass
        if self.proc.poll() is None:
            try:  # its own session: the zygote and any rank it left behind
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


_ZYGOTE: Optional[Zygote] = None


def get_zygote() -> Zygote:
    global _ZYGOTE
    if _ZYGOTE is None or not _ZYGOTE.alive():
        _ZYGOTE = Zygote()
        atexit.register(_ZYGOTE.close)
    return _ZYGOTE


# --------------------------------------------------------------------------------- the API
def run_ranks(fn: Callable, world: int, kwargs: Optional[dict] = None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
              compat_exclude: frozenset | set = frozenset(), pg_timeout_s: int = PG_TIMEOUT_S,
              grace_s: float = 5.0, prepare: bool = True, env: Optional[dict] = None,
              log_dir: Optional[str] = None, info: Optional[dict] = None) -> list:
    """Run ``fn(ctx, **kwargs)`` on ``world`` gloo ranks forked from the zygote; return the per-rank
    results (list indexed by rank). Raises :class:`RankFailure` if any rank raised or died, and
    :class:`RankTimeout` (with stack dumps) past ``timeout_s``.

    ``prepare=False`` skips the compat patches and the process group (for tests of megatron-core
    behaviour without megatron-ling's setup); ``env`` adds environment variables in the ranks.
    """
    from megatron_ling import compat

    unknown = set(compat_exclude) - set(compat.PATCHES)
    if unknown:
        raise ValueError(f"compat_exclude: unknown compat patch {sorted(unknown)[0]!r}")
    req = dict(world=world, call=pickle.dumps((fn, dict(kwargs or {}))), timeout_s=float(timeout_s),
               compat_exclude=sorted(compat_exclude), pg_timeout_s=int(pg_timeout_s), grace_s=float(grace_s),
               prepare=prepare, env=env, log_dir=log_dir, info=info, sys_path=list(sys.path))
    out = get_zygote().run(req)
    try:
        return _collect(fn, world, out, timeout_s)
    finally:  # failures carry the log tails; pass log_dir to keep whole logs
        if log_dir is None:
            shutil.rmtree(os.path.dirname(out["logs"][0]), ignore_errors=True)


def _collect(fn: Callable, world: int, out: dict, timeout_s: float) -> list:
    results, logs = out["results"], out["logs"]
    name = getattr(fn, "__qualname__", repr(fn))
    tails = {r: _tail(p) for r, p in logs.items()}
    if out["stuck"] and not any(v[0] == "error" for v in results.values()):
        msg = (f"{name}: ranks {out['stuck']} still running after the {timeout_s:.0f} s case timeout; killed. "
               f"Stacks (faulthandler) and log tails:\n" +
               "\n".join(f"--- rank {r} ({logs[r]}) ---\n{tails[r]}" for r in out["stuck"]))
        raise RankTimeout(msg, {r: "timeout" for r in out["stuck"]}, tails)
    failures = {}
    for r in range(world):
        v = results.get(r)
        if v is None:
            failures[r] = f"exited with code {out['exit_codes'].get(r)} without a result"
        elif v[0] != "ok":
            failures[r] = v[2] or v[1]
    if failures:
        first = next((r for r in out.get("order", []) if r in failures), min(failures))
        brief = {r: (results[r][1] if r in results and results[r][0] != "ok" else failures[r]) for r in failures}
        msg = (f"{name}: rank(s) {sorted(failures)} failed, first rank {first}: {brief[first]}" +
               "".join(f"; rank {r}: {brief[r][:200]}" for r in sorted(brief) if r != first) +
               f"\n--- traceback of rank {first} ---\n{failures[first]}\n--- log tail of rank {first} ---\n"
               f"{tails[first][-3000:]}")
        raise RankFailure(msg, failures, tails)
    return [results[r][1] for r in range(world)]
