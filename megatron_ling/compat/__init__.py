"""Make megatron-core (0.16.1 through 0.19.x) run on CPU with the gloo backend, and hold every
difference between those megatron-core versions.

Megatron-Core assumes CUDA (hard-coded ``device='cuda'``, CUDA RNG trackers and streams) and, on CPU
with gloo, gives a few silently wrong results. This is the one place where megatron-ling works
around megatron-core; each patch below names the megatron-core ``file:line`` it works around and
has a test in ``tests/test_compat.py`` that fails without it.

Each patch applies ``when`` its condition holds: ``"cpu"`` patches only where CUDA is absent (GPU
clusters run megatron-core's CUDA paths unpatched), ``"no_te"`` patches wherever Transformer Engine
(and with it Apex's fused kernels) is missing, GPU or not, ``"always"`` for a megatron-core bug on every
device. ``install()`` is idempotent, and
``install(exclude={"name"})`` leaves patches out (used by the tests to prove that each is needed).
Call it in every process before building models or optimizers.

Where megatron-core versions differ, megatron-ling asks ``mcore_at_least("0.19")`` here (the one
version switch) or calls a helper of this module (``mtp_tracked_losses``); each patch's ``site`` names
the versions it was verified on.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch

_INSTALLED: set[str] = set()


# ------------------------------------------------------------------ the one version switch
def _mcore_version() -> tuple[int, ...]:
    from importlib.metadata import version

    from packaging.version import Version

    return Version(version("megatron-core")).release


MCORE_VERSION: tuple[int, ...] = _mcore_version()
"""The installed megatron-core release, e.g. (0, 19, 2). Supported: 0.16.1 through 0.19.x."""


def mcore_at_least(v: str) -> bool:
    """The one place megatron-ling asks which megatron-core it runs on (``mcore_at_least("0.19")``)."""
    want = tuple(int(x) for x in v.split("."))
    return MCORE_VERSION[: len(want)] >= want


# ------------------------------------------------------------------ GPTModel deprecation notice
class _DropGPTModelDeprecation:
    """logging filter: megatron-core 0.19 logs "GPTModel IS DEPRECATED ... use HybridModel" for every
    model chunk built (models/gpt/gpt_model.py:118). megatron-ling builds Ling 2.0 (attention + MoE,
    no Mamba) on GPTModel on purpose; docs/megatron-core.md says what HybridModel means for it."""

    @staticmethod
    def filter(record) -> bool:
        return not str(record.msg).startswith("GPTModel IS DEPRECATED")


def quiet_gptmodel_deprecation() -> None:
    import logging

    log = logging.getLogger("megatron.core.models.gpt.gpt_model")
    if not any(isinstance(f, _DropGPTModelDeprecation) for f in log.filters):
        log.addFilter(_DropGPTModelDeprecation())


# ------------------------------------------------------------------ MTP loss tracker
# megatron-core records each MTP layer's loss in MTPLossLoggingHelper.tracker. 0.16.1 keeps it under
# "values" (reduce_loss_in_tracker/clean_loss_in_tracker, multi_token_prediction.py:~330); 0.19 keeps
# loss, correct and total under "loss_values"/... (reduce_metrics_in_tracker/clean_metrics_in_tracker,
# multi_token_prediction.py:342). Reading the old key on 0.19 silently logs an MTP loss of 0.
def mtp_tracked_losses(reduce: bool = True) -> torch.Tensor | None:
    """Per-MTP-layer loss sums megatron-core recorded since the last clear (summed over micro-batches),
    or None where nothing was recorded (a stage without the MTP block). ``reduce``: first all-reduce
    them over the groups megatron recorded (TP/CP sum, DP average), as Megatron-LM's loop does."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper as H

    key = "loss_values" if mcore_at_least("0.19") else "values"
    if key not in H.tracker:
        return None
    if reduce:
        (H.reduce_metrics_in_tracker if mcore_at_least("0.19") else H.reduce_loss_in_tracker)()
    return H.tracker[key].detach().clone()


def mtp_inner_layer(mtp_layer):
    """The transformer layer inside a MultiTokenPredictionLayer: ``transformer_layer`` in 0.16.1,
    ``mtp_model_layer`` in 0.19 (multi_token_prediction.py:1022/1039)."""
    return mtp_layer.mtp_model_layer if mcore_at_least("0.19") else mtp_layer.transformer_layer


def clear_mtp_tracker() -> None:
    """Forget every recorded MTP loss (and its groups)."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper as H

    H.tracker.clear()


@dataclass(frozen=True)
class Patch:
    name: str
    when: str  # "cpu" | "no_te" | "always"
    site: str  # megatron-core file:line worked around (0.16.1 line numbers unless a version is named)
    why: str
    apply: Callable[[], None]
    versions: tuple[str, str] = ("0.16", "0.19")  # megatron-core minor versions it applies to (inclusive)

    def applies_to_installed(self) -> bool:
        lo, hi = (tuple(int(x) for x in v.split(".")) for v in self.versions)
        return lo <= MCORE_VERSION[:2] <= hi


PATCHES: dict[str, Patch] = {}


def _patch(name: str, when: str, site: str, why: str, versions: tuple[str, str] = ("0.16", "0.19")):
    def deco(fn):
        PATCHES[name] = Patch(name, when, site, why, fn, versions)
        return fn

    return deco


def have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a broken install (missing CUDA libraries)
        return False
    return True


def condition_holds(when: str) -> bool:
    if when == "cpu":
        return not torch.cuda.is_available()
    if when == "no_te":
        return not have_te()
    if when == "always":
        return True
    raise ValueError(when)


def install(exclude: set[str] | frozenset[str] = frozenset(), force: bool = False) -> list[str]:
    """Install every applicable patch not in ``exclude`` (its ``when`` holds and it applies to the
    installed megatron-core; ``force``: regardless of both).
    Returns the names installed by this call."""
    exclude = set(exclude) | {x for x in os.environ.get("LING_COMPAT_EXCLUDE", "").split(",") if x}
    unknown = exclude - set(PATCHES)
    if unknown:
        raise ValueError(f"LING_COMPAT_EXCLUDE: unknown compat patch {sorted(unknown)[0]!r}; "
                         f"known: {', '.join(PATCHES)}")
    done = []
    for name, p in PATCHES.items():
        if name in exclude or name in _INSTALLED or not (force or (condition_holds(p.when) and p.applies_to_installed())):
            continue
        p.apply()
        _INSTALLED.add(name)
        done.append(name)
    return done


def installed() -> set[str]:
    return set(_INSTALLED)


# --------------------------------------------------------------------------------- device
def _is_cuda(d) -> bool:
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str):
        return d.startswith("cuda")
    return isinstance(d, int) and not isinstance(d, bool)  # an ordinal means a CUDA device


class _CudaToCpu(torch.overrides.TorchFunctionMode):
    """Rewrites device='cuda' (keyword, or the positional target of Tensor.to) to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if len(args) > 1 and _is_cuda(args[1]) and getattr(func, "__name__", "") == "to":
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


_MODE = None


@_patch("cuda_device", "cpu", "optimizer/optimizer.py:907, pipeline_parallel/schedules.py:596, optimizer/clip_grads.py:90",
        "tensors created with a hard-coded device='cuda'")
def _cuda_device():
    global _MODE
    if _MODE is None:
        _MODE = _CudaToCpu()
        _MODE.__enter__()


class _NoStream:
    """Stand-in for torch.cuda.Stream/Event: on the CPU every operation is already complete."""

    def __init__(self, *a, **k):
        pass

    def __getattr__(self, name):  # wait_stream, wait_event, record, synchronize, ...
        return lambda *a, **k: None

    def record_event(self, event=None):
        return event or _NoStream()

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


_ONE_STREAM = _NoStream()


@_patch("cuda_runtime", "cpu", "transformer/moe/router.py:169 (torch.cuda.current_device), distributed/param_and_grad_buffer.py (streams/events), "
        "tensor_parallel/random.py:41 (torch.cuda.current_device)",
        "CUDA streams, events and device queries called unconditionally")
def _cuda_runtime():
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.Stream = _NoStream
    torch.cuda.Event = _NoStream
    torch.cuda.current_stream = lambda *a, **k: _ONE_STREAM
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.Tensor.record_stream = lambda self, s: None
    torch.Tensor.cuda = lambda self, *a, **k: self


@_patch("tensor_type", "cpu", "optimizer/optimizer.py:671/690, optimizer/distrib_optimizer.py:361/420/582, "
        "optimizer/clip_grads.py:167", "param.type() compared against 'torch.cuda.*Tensor' names")
def _tensor_type():
    orig = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kw):
        s = orig(self, dtype, non_blocking, **kw) if (dtype is not None or kw) else orig(self)
        # Only megatron's optimizer asks, and only for the name: report the CUDA spelling there.
        if dtype is None and not kw and not s.startswith("torch.cuda.") and \
                "/megatron/core/optimizer/" in sys._getframe(1).f_code.co_filename:
            return "torch.cuda." + s[len("torch."):]
        return s

    torch.Tensor.type = type_


@_patch("rng_tracker", "cpu", "tensor_parallel/random.py:41/72 (_get/_set_cuda_rng_state), CudaRNGStatesTracker.add/fork",
        "the model-parallel RNG tracker keeps CUDA generator states")
def _rng_tracker():
    from megatron.core.tensor_parallel import random as mr

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name=mr._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

    mr.CudaRNGStatesTracker.add = add
    mr.CudaRNGStatesTracker.fork = fork
    # Activation recompute saves/restores "the CUDA RNG": on the CPU that is the CPU generator.
    mr._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mr._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)


@_patch("recompute_fp8_flag", "no_te", "tensor_parallel/random.py:636",
        "`self.fp8 = fp8 is not None` sends CheckpointWithoutOutput(fp8=False) into the TE-only FP8 "
        "branch (NameError FP8GlobalStateManager) in selective recompute without Transformer Engine")
def _recompute_fp8_flag():
    from megatron.core.tensor_parallel import random as mr

    orig = mr.CheckpointWithoutOutput.__init__

    def init(self, fp8=False):
        orig(self, fp8)
        self.fp8 = bool(fp8) and mr.HAVE_TE

    mr.CheckpointWithoutOutput.__init__ = init


@_patch("recompute_share_storage", "cpu", "tensor_parallel/random.py:68 (_get_share_storage) / :819 (0.19.2)",
        "0.19's selective recompute JIT-compiles a C++ extension (torch load_inline) at the first backward: "
        "minutes on a small CPU machine, and a rank killed while compiling leaves a lock every later run "
        "waits on forever; on the CPU a storage copy does the same", versions=("0.19", "0.19"))
def _recompute_share_storage():
    from megatron.core.tensor_parallel import random as mr

    def share_storage(output, recomputation_output):
        # Refill output's (freed) storage in place, so every view of it sees the recomputed data,
        # as the extension's zero-copy pointer swap does.
        dst, src = output.untyped_storage(), recomputation_output.untyped_storage()
        dst.resize_(src.nbytes())
        dst.copy_(src)

    mr._get_share_storage = lambda: share_storage


@_patch("torch_norm_sp", "no_te", "transformer/torch_norm.py:32",
        "torch RMSNorm asserts not sequence_parallel; the norm is per token, so SP only needs the "
        "weight marked sequence_parallel for finalize_model_grads to all-reduce its grad over TP")
def _torch_norm_sp():
    import copy

    from megatron.core.transformer import torch_norm as tn

    orig_new = tn.WrappedTorchNorm.__new__

    def new(cls, config, hidden_size, eps=1e-5, *a, **k):
        sp = config.sequence_parallel
        if sp:
            config = copy.copy(config)
            config.sequence_parallel = False
        mod = orig_new(cls, config, hidden_size, eps, *a, **k)
        for p in mod.parameters():
            p.sequence_parallel = sp
        return mod

    tn.WrappedTorchNorm.__new__ = new


@_patch("gloo_batched_p2p", "cpu", "pipeline_parallel/p2p_communication.py:16 (_batched_p2p_ops)",
        "SILENT WRONG RESULT: gloo matches isend/irecv FIFO per peer, so when the previous and next "
        "stage are the same rank (PP=2 with VPP) batched p2p swaps activations and gradients")
def _gloo_batched_p2p():
    from megatron.core.pipeline_parallel import p2p_communication as p2p

    def batched(**kw):
        return list(p2p._p2p_ops(**kw).values())

    p2p._batched_p2p_ops = batched


@_patch("dist_opt_step_state", "no_te", "optimizer/distrib_optimizer.py:640/819-825/940",
        "without Apex/TE the distributed optimizer (a) cannot build a loading state dict before the "
        "first step, (b) SILENTLY gives every param one shared Adam 'step' tensor after a load, so "
        "torch Adam increments it once per param and the bias correction is wrong, (c) KeyErrors on "
        "'step' in fully_reshardable loads")
def _dist_opt_step_state():
    from megatron.core.optimizer import distrib_optimizer as do

    orig_sd = do.DistributedOptimizer.state_dict

    def state_dict(self):
        inner = self.optimizer
        if isinstance(inner, torch.optim.Optimizer):
            params = [p for g in inner.param_groups for p in g["params"]]
            if any("step" not in inner.state[p] for p in params):
                if self.init_state_fn is not None:
                    self.init_state_fn(inner, self.config)
                for p in params:
                    inner.state[p].setdefault("step", torch.tensor(0.0))
        return orig_sd(self)

    do.DistributedOptimizer.state_dict = state_dict

    orig_set = do.DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            gi, go = self.model_param_group_index_map[model_param]
            st = self.optimizer.state[self.optimizer.param_groups[gi]["params"][go]]
            if "step" in st:
                tensors = dict(tensors, step=st["step"])
        with torch.no_grad():  # fp32 main params are views of leaves that require grad
            return orig_set(self, model_param, tensors)

    do.DistributedOptimizer._set_main_param_and_optimizer_states = set_states

    orig_load = do.DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        r = orig_load(self, state_dict)
        inner = self.optimizer
        if isinstance(inner, torch.optim.Optimizer):
            for g in inner.param_groups:
                for p in g["params"]:
                    st = inner.state.get(p)
                    if st and torch.is_tensor(st.get("step")):
                        step = g.get("step")
                        st["step"] = (torch.tensor(float(step), dtype=torch.float32) if step is not None
                                      else st["step"].clone())
        return r

    do.DistributedOptimizer.load_state_dict = load_state_dict


@_patch("gloo_shape_exchange", "cpu", "pipeline_parallel/p2p_communication.py:238 (0.16.1) / :259 (0.19.2) "
        "(_communicate_shapes, used with mtp_standalone)",
        "DEADLOCK: a standalone MTP stage sends ((1+mtp)*s, b, h), so every p2p call first exchanges shapes and "
        "waits for its shape sends too. gloo sends complete only once the peer has posted the matching "
        "receive (NCCL sends this small finish eagerly); with VPP the stages form a ring and the "
        "interleaved schedule's blocking shape waits close a cycle")
def _gloo_shape_exchange():
    from megatron.core.pipeline_parallel import p2p_communication as p2p

    def communicate_shapes(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next):
        # Post every shape op at once but wait only for the receives; a send's work (and with it its
        # buffer) is kept until it completes, which makes shape sends eager as they are on NCCL. gloo
        # matches messages per peer and tag in posting order, so the data that follows stays in order.
        # Forward shapes (to next / from prev) and backward shapes (to prev / from next) get their own
        # tags, so that at PP=2 (prev == next: one peer) they cannot be paired crosswise.
        fwd, bwd = 0x51, 0x52
        pending = [w for w in getattr(self, "_ling_shape_sends", []) if not w.is_completed()]
        group, recvs = self.pp_group, {}
        for tensor, peer, tag in ((tensor_send_prev, self.prev_rank, bwd), (tensor_send_next, self.next_rank, fwd)):
            if tensor is not None:
                pending.append(torch.distributed.isend(torch.tensor(tensor.size(), dtype=torch.int64),
                                                       peer, group=group, tag=tag))
        for want, peer, key, tag in ((recv_prev, self.prev_rank, "prev", fwd), (recv_next, self.next_rank, "next", bwd)):
            if want:
                buf = torch.empty((3,), dtype=torch.int64)
                recvs[key] = (buf, torch.distributed.irecv(buf, peer, group=group, tag=tag))
        self._ling_shape_sends = pending
        shapes = {}
        for key, (buf, work) in recvs.items():
            work.wait()
            shapes[key] = buf.tolist()
        return shapes.get("prev", [0, 0, 0]), shapes.get("next", [0, 0, 0])

    p2p.P2PCommunicator._communicate_shapes = communicate_shapes


def _die_with_parent() -> None:
    """Make a helper process exit when its parent dies (Linux), so a killed rank leaves no
    process behind holding its sockets and output open."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


@_patch("ckpt_fork_queue", "cpu", "dist_checkpointing/strategies/filesystem_async.py:54 (0.16.1, "
        "_get_write_results_queue) / :53 (0.19.2, get_write_results_queue(mp_mode='spawn'))",
        "the first torch_dist save starts a spawn-context Manager: ~3 s per process and it re-imports an "
        "unguarded __main__; a fork-context Manager is instant (and dies with its rank)")
def _ckpt_fork_queue():
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    def queue(mp_mode: str = "fork"):
        if fsa._results_queue is None:
            mgr = SyncManager(ctx=mp.get_context("fork"))
            mgr.start(initializer=_die_with_parent)
            fsa._results_queue = mgr.Queue()
            fsa._ling_manager = mgr  # keep it referenced for the life of the process
        return fsa._results_queue

    # 0.19 renamed it (and calls it by module attribute, also from strategies/torch.py:1142)
    setattr(fsa, "get_write_results_queue" if mcore_at_least("0.19") else "_get_write_results_queue", queue)


@_patch("alltoall_splits", "cpu", "transformer/moe/moe_utils.py:1093 (maybe_move_tensor_to_cpu)",
        "only CUDA tensors become numpy splits; gloo all_to_all_single rejects CPU tensor splits")
def _alltoall_splits():
    from megatron.core.transformer.moe import moe_utils as mu
    from megatron.core.transformer.moe import token_dispatcher as td

    orig = mu.maybe_move_tensor_to_cpu

    def move(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy() if as_numpy else tensor
        return orig(tensor, as_numpy=as_numpy, record_stream=record_stream)

    mu.maybe_move_tensor_to_cpu = move
    td.maybe_move_tensor_to_cpu = move


@_patch("router_gemm_name", "no_te", "transformer/moe/moe_utils.py:1192",
        "te_general_gemm is referenced although it is only imported with Transformer Engine (NameError); "
        "0.19 sets it to None without TE (moe_utils.py:52)", versions=("0.16", "0.16"))
def _router_gemm_name():
    from megatron.core.transformer.moe import moe_utils as mu

    if not hasattr(mu, "te_general_gemm"):
        mu.te_general_gemm = None


@_patch("gloo_uneven_all_gather", "cpu", "tensor_parallel/mappings.py:150/185 (output/input_split_sizes)",
        "gloo all_gather/reduce_scatter need equal sizes; the alltoall dispatcher with ETP>1 gathers and "
        "reduce-scatters uneven token counts over the expert-TP group (NCCL handles them)")
def _gloo_uneven_all_gather():
    from megatron.core.tensor_parallel import mappings as mp

    gather0, reduce_scatter0 = mp._gather_along_first_dim, mp._reduce_scatter_along_first_dim

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather0(input_, group, output_split_sizes, use_global_buffer)
        # pad every rank's part to the largest, gather equal sizes, cut the padding off again
        padded = input_.new_zeros((max(output_split_sizes),) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in range(group.size())]
        torch.distributed.all_gather(parts, padded, group=group)
        return torch.cat([p[:n] for p, n in zip(parts, output_split_sizes)])

    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter0(input_, group, input_split_sizes, use_global_buffer)
        full = input_.contiguous().clone()
        torch.distributed.all_reduce(full, group=group)
        start = sum(input_split_sizes[: group.rank()])
        return full[start: start + input_split_sizes[group.rank()]].contiguous()

    mp._gather_along_first_dim, mp._reduce_scatter_along_first_dim = gather, reduce_scatter


@_patch("expert_bias_padding_mask", "always",
        "transformer/moe/router.py:542 (0.16.1), :738 (0.19.2) (TopKRouter._apply_expert_bias)",
        "`routing_map & (~padding_mask)` broadcasts the [tokens] padding mask against the last "
        "(expert) dimension of the [tokens, experts] routing map: a shape error (or, with as many "
        "tokens as experts, silently wrong expert-bias counts) whenever GPTModel gets a padding_mask "
        "and the expert bias is on (chat data passes one: training/sft.py)")
def _expert_bias_padding_mask():
    from megatron.core.transformer.moe.router import TopKRouter

    orig = TopKRouter._apply_expert_bias

    def apply_expert_bias(self, routing_map, padding_mask=None):
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1, 1)  # one row per token, as routing_map
        return orig(self, routing_map, padding_mask=padding_mask)

    TopKRouter._apply_expert_bias = apply_expert_bias


@_patch("sp_padding_mask_later_stages", "always",
        "models/gpt/gpt_model.py:314-320 (0.16.1), :352-358 (0.19.2) (GPTModel._preprocess)",
        "the padding_mask is scattered to the sequence-parallel region only on the first pipeline "
        "stage (the branch that runs the embedding); later stages hand the router the full [b, s] mask "
        "against [s/tp, b] local tokens: a shape error at TP+SP x PP whenever GPTModel gets a "
        "padding_mask (chat data passes one: training/sft.py)")
def _sp_padding_mask_later_stages():
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt.gpt_model import GPTModel

    orig = GPTModel._preprocess

    def preprocess(self, input_ids, position_ids, decoder_input=None, inference_context=None,
                   packed_seq_params=None, padding_mask=None):
        if padding_mask is not None and self.config.sequence_parallel and not self.pre_process \
                and decoder_input is None:  # scatter as the first stage does (its [b, s] -> [b, s/tp])
            padding_mask = tensor_parallel.scatter_to_sequence_parallel_region(
                padding_mask.transpose(0, 1).contiguous()).transpose(0, 1).contiguous()
        return orig(self, input_ids, position_ids, decoder_input=decoder_input, inference_context=inference_context,
                    packed_seq_params=packed_seq_params, padding_mask=padding_mask)

    GPTModel._preprocess = preprocess
