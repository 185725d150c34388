"""The ``profiling`` recipe section and the pipeline bubble recorder for real multi-rank runs (no fork of Megatron-Core).

While a chosen step runs, three megatron-core 0.16.1 functions are wrapped (and restored after):

* ``schedules.forward_step``   - one forward of one micro batch on one model chunk, loss included
  (both 1F1B schedules look the name up in the module at call time, so the wrapper is seen);
* ``schedules.backward_step``  - its backward; the micro batch and chunk are recovered from the
  identity of the output tensor object that the schedule hands back from the forward;
* ``P2PCommunicator._communicate`` - every blocking pipeline send/recv (the time a rank waits for
  its neighbour shows up here).

Timestamps are ``time.perf_counter`` on the CPU, CUDA events on GPUs (host timestamps would only
show kernel launch times). Each recorded step starts with two barriers over the world group; the
time right after them is the step's clock origin ``t0`` on every rank (ranks on one host also share
CLOCK_MONOTONIC, recorded as ``t0_abs``, which the report prefers when all hosts agree). One JSON
per rank is (re)written after each recorded step to ``<dir>/rank<NNNNN>.json``, atomically, in the
format owned by ``megatron_ling.pipeline.profile``.

Trainer use::

    profiler = PipelineProfiler(cfg.profiling, run_dir, meta={...})
    for iteration in ...:
        with profiler.step(iteration, bundle.chunks):
            train_step(...)
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_ling.config_utils import check_fields, spec
from megatron_ling.errors import LingConfigError
from megatron_ling.pipeline.profile import write_rank_profile


@dataclass
class ProfilingConfig:
    """Pipeline bubble profiler (``ling-bubbles report RUN_DIR`` reads what it writes).

    enabled   record forward/backward/p2p-wait intervals of every pipeline rank
    steps     iterations to record (1-based, as the trainer counts); skip the first, which pays
              one-off allocation and warm-up costs
    dir       output folder; null = RUN_DIR/bubbles
    all_ranks record every rank; by default only the pipeline ranks of the first model replica
              (tp = cp = dp = 0), which is what the bubble analysis needs
    cuda_events time with CUDA events on GPUs (host timestamps would only show launch times)
    """

    enabled: bool = False
    steps: list[int] = spec(default_factory=lambda: [2, 3], range=">= 1")
    dir: Optional[str] = None
    all_ranks: bool = False
    cuda_events: bool = True

    def validate(self, prefix: str = "profiling") -> "ProfilingConfig":
        check_fields(self, prefix)
        if not isinstance(self.enabled, bool):
            raise LingConfigError(f"{prefix}.enabled: must be true or false, got {self.enabled!r}")
        if isinstance(self.steps, int):
            self.steps = [self.steps]
        if not isinstance(self.steps, (list, tuple)) or not self.steps or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in self.steps):
            raise LingConfigError(f"{prefix}.steps: must be a non-empty list of iterations >= 1, got {self.steps!r}")
        if self.dir is not None and not isinstance(self.dir, str):
            raise LingConfigError(f"{prefix}.dir: must be a path or null, got {self.dir!r}")
        return self


class _Clock:
    """perf_counter on the CPU; CUDA events (resolved after the step) on GPUs."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.pending: list = []  # (event, slot list, index)
        self.ref = None
        self.t0 = 0.0

    def start(self):
        self.t0 = time.perf_counter()
        if self.cuda:
            self.ref = torch.cuda.Event(enable_timing=True)
            self.ref.record()

    def now(self, slot: list, index: int):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.pending.append((ev, slot, index))
        else:
            slot[index] = time.perf_counter() - self.t0

    def resolve(self):
        if self.cuda and self.pending:
            torch.cuda.synchronize()
            for ev, slot, i in self.pending:
                slot[i] = self.ref.elapsed_time(ev) / 1e3
        self.pending = []


class PipelineProfiler:
    """Records forward/backward/p2p intervals of chosen steps; see the module docstring."""

    def __init__(self, config: Optional[ProfilingConfig], run_dir: Optional[str] = None,
                 meta: Optional[dict] = None):
        self.cfg = (config or ProfilingConfig()).validate()
        self.dir = self.cfg.dir or (os.path.join(run_dir, "bubbles") if run_dir else None)
        if self.cfg.enabled and not self.dir:
            from megatron_ling.errors import LingConfigError

            raise LingConfigError("profiling.dir: no output folder; set profiling.dir or give the run a directory")
        self.meta = dict(meta or {})
        self.steps_done: list = []
        self._events: list = []
        self._chunks: list = []
        self._out_ids: dict = {}
        self._clock: Optional[_Clock] = None
        self._active = False

    # ------------------------------------------------------------------------ public
    def enabled_for(self, iteration: int) -> bool:
        return self.cfg.enabled and iteration in self.cfg.steps

    @contextlib.contextmanager
    def step(self, iteration: int, model_chunks):
        """Wrap one training iteration; records it when ``iteration`` is in ``profiling.steps``."""
        if not self.enabled_for(iteration):
            yield
            return
        self._begin(model_chunks)
        try:
            yield
        finally:
            self._end(iteration)

    # ---------------------------------------------------------------------- internals
    def _should_write(self) -> bool:
        from megatron.core import parallel_state as ps

        if self.cfg.all_ranks:
            return True
        return (ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
                and ps.get_data_parallel_rank() == 0)

    def _begin(self, model_chunks):
        from megatron.core.pipeline_parallel import p2p_communication, schedules

        self._chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        self._events = []
        self._out_ids = {}
        self._fwd_count = 0
        self._clock = _Clock(cuda=torch.cuda.is_available() and self.cfg.cuda_events)
        # clock origin: every rank leaves the second barrier within the barrier's exit skew
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.barrier()
        self._clock.start()
        self._orig = (schedules.forward_step, schedules.backward_step,
                      p2p_communication.P2PCommunicator._communicate)
        orig_fwd, orig_bwd, orig_comm = self._orig
        prof = self

        def forward_step(*args, **kwargs):
            model = args[2] if len(args) > 2 else kwargs.get("model")
            chunk = prof._chunk_of(model, kwargs.get("vp_stage"))
            mb = kwargs.get("current_microbatch")
            ev = ["F", chunk, -1 if mb is None else mb, 0.0, 0.0]
            prof._clock.now(ev, 3)
            out = orig_fwd(*args, **kwargs)
            prof._clock.now(ev, 4)
            if mb is None:  # older call sites: count forwards per chunk
                ev[2] = sum(1 for e in prof._events if e[0] == "F" and e[1] == chunk)
            prof._events.append(ev)
            output_tensor = out[0] if isinstance(out, tuple) else out
            prof._out_ids[id(output_tensor)] = (chunk, ev[2])
            return out

        def backward_step(input_tensor, output_tensor, *args, **kwargs):
            chunk, mb = prof._out_ids.pop(id(output_tensor), (-1, -1))
            ev = ["B", chunk, mb, 0.0, 0.0]
            prof._clock.now(ev, 3)
            out = orig_bwd(input_tensor, output_tensor, *args, **kwargs)
            prof._clock.now(ev, 4)
            prof._events.append(ev)
            return out

        def _communicate(self_, *args, **kwargs):
            flags = "".join(c for c, on in (("s", kwargs.get("tensor_send_next") is not None),
                                            ("S", kwargs.get("tensor_send_prev") is not None),
                                            ("r", bool(kwargs.get("recv_prev"))),
                                            ("R", bool(kwargs.get("recv_next")))) if on)
            ev = ["W", -1, -1, 0.0, 0.0, flags]
            prof._clock.now(ev, 3)
            out = orig_comm(self_, *args, **kwargs)
            prof._clock.now(ev, 4)
            prof._events.append(ev)
            return out

        schedules.forward_step = forward_step
        schedules.backward_step = backward_step
        p2p_communication.P2PCommunicator._communicate = _communicate
        self._active = True

    def _chunk_of(self, model, vp_stage) -> int:
        for i, c in enumerate(self._chunks):
            if c is model:
                return i
        return int(vp_stage or 0)

    def _restore(self):
        if self._active:
            from megatron.core.pipeline_parallel import p2p_communication, schedules

            schedules.forward_step, schedules.backward_step, p2p_communication.P2PCommunicator._communicate = self._orig
            self._active = False

    def _end(self, iteration: int):
        self._restore()
        self._clock.resolve()
        from megatron.core import parallel_state as ps

        nmb = 1 + max((e[2] for e in self._events if e[0] == "F"), default=-1)
        step = {"iteration": iteration, "t0": 0.0, "t0_abs": self._clock.t0, "num_microbatches": nmb,
                "events": [[e[0], e[1], e[2], round(e[3], 9), round(e[4], 9)] + e[5:] for e in self._events]}
        self.steps_done.append(step)
        if self._should_write():
            self._write(ps)

    def _write(self, ps):
        vpp = ps.get_virtual_pipeline_model_parallel_world_size() or 1
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        coords = {
            "rank": rank,
            "pp_rank": ps.get_pipeline_model_parallel_rank(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "vpp": vpp,
            "tp_rank": ps.get_tensor_model_parallel_rank(),
            "dp_rank": ps.get_data_parallel_rank(),
            "host": socket.gethostname(),
            "clock": "cuda_events" if self._clock.cuda else "perf_counter",
        }
        write_rank_profile(self.dir, coords, self.meta, self.steps_done)
