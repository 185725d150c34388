"""Each megatron_ling.compat patch is needed: a minimal real scenario fails (or gives a wrong
result) with that one patch left out, and works with every patch in.

Patches are process-global, so every scenario runs in ranks forked by tests.support.harness from an
unpatched zygote; ``compat_exclude`` leaves the patch out in those ranks only.
"""
import re
import time

import pytest

from megatron_ling import compat
from tests.support.harness import RankFailure, run_ranks
from tests.support import compat_cases as C
from tests.support import fidelity as F
from tests.support import resharding as R

SC = F.case(steps=1)
SC4 = F.case(steps=4)
TOL = 1e-5


def _train(world, parallel, exclude=frozenset(), options=None):
    sc = F.case(steps=1, options=options or {})
    ref = F.reference(SC)
    res = run_ranks(F.layout_run, world, dict(recipe=sc, parallel=parallel, full0=ref["full0"]),
                    compat_exclude=exclude, timeout_s=120, grace_s=3)
    return F.compare(ref, res)


def _megatron_frame(tb: str) -> str:
    frames = re.findall(r'site-packages/(megatron/core/[^"]+)", line (\d+)', tb)
    return f"{frames[-1][0]}:{frames[-1][1]}" if frames else "?"


def _expect_failure(name, fn, needle):
    with pytest.raises(RankFailure) as e:
        fn()
    msg = str(e.value)
    assert needle in msg, msg[:2000]
    print(f"COMPAT {name}: without it -> {needle!r} at {_megatron_frame(msg)}")


def _assert_matches(d):
    assert d["logits0"] <= TOL and d["loss"] <= TOL and d["grad_norm"] <= TOL, d


# patch -> (world, ParallelConfig fields, ModelOptions fields, text of the failure without it)
CRASHES = {
    "cuda_device": (1, dict(distributed_optimizer=False), None, "Torch not compiled with CUDA enabled"),
    "cuda_runtime": (1, dict(distributed_optimizer=False), None, "Torch not compiled with CUDA enabled"),
    "tensor_type": (1, dict(distributed_optimizer=True), None, "Wrapped parameters must be one of torch.cuda"),
    "rng_tracker": (1, dict(distributed_optimizer=False), None, "tensor_parallel/random.py"),
    "recompute_fp8_flag": (1, dict(distributed_optimizer=False),
                           dict(recompute="selective", recompute_modules=["layernorm"]),
                           "name 'FP8GlobalStateManager' is not defined"),
    "torch_norm_sp": (2, dict(tp=2), None, "sequence parallel not supported by torch LayerNorm"),
    "alltoall_splits": (2, dict(ep=2, moe_token_dispatcher="alltoall"), None,
                        "all_to_all_single(): incompatible function arguments"),
    "router_gemm_name": (1, dict(distributed_optimizer=False), None, "name 'te_general_gemm' is not defined"),
}
if "gloo_uneven_all_gather" in compat.PATCHES:  # the alltoall dispatcher with ETP > 1
    CRASHES["gloo_uneven_all_gather"] = (4, dict(tp=2, ep=2, moe_token_dispatcher="alltoall"), None,
                                         "ProcessGroupGloo::allgather: invalid tensor size")
OTHERS = {"gloo_batched_p2p", "dist_opt_step_state", "ckpt_fork_queue", "gloo_shape_exchange",
          "recompute_share_storage", "expert_bias_padding_mask", "sp_padding_mask_later_stages"}


def test_every_patch_has_a_scenario():
    assert set(compat.PATCHES) == set(CRASHES) | OTHERS, sorted(set(compat.PATCHES) ^ (set(CRASHES) | OTHERS))


@pytest.mark.parametrize("name", sorted(CRASHES))
def test_patch_prevents_a_crash(name):
    world, parallel, options, needle = CRASHES[name]
    if not compat.PATCHES[name].applies_to_installed():
        # A patch for older megatron-cores only: this one no longer needs it (and never gets it).
        print(f"COMPAT {name}: not needed on megatron-core {compat.MCORE_VERSION}")
        _assert_matches(_train(world, parallel, frozenset(), options))
        return
    _expect_failure(name, lambda: _train(world, parallel, {name}, options), needle)
    _assert_matches(_train(world, parallel, frozenset(), options))


def test_patches_apply_to_the_versions_they_name():
    router = compat.PATCHES["router_gemm_name"]
    assert router.versions == ("0.16", "0.16")
    assert router.applies_to_installed() == (compat.MCORE_VERSION[:2] == (0, 16))
    share = compat.PATCHES["recompute_share_storage"]
    assert share.versions == ("0.19", "0.19")
    assert share.applies_to_installed() == (compat.MCORE_VERSION[:2] == (0, 19))
    assert all(p.applies_to_installed() for n, p in compat.PATCHES.items()
               if n not in ("router_gemm_name", "recompute_share_storage"))
    assert compat.mcore_at_least("0.16.1") and compat.mcore_at_least("0.16")
    assert compat.mcore_at_least("0.19") == (compat.MCORE_VERSION >= (0, 19))


def test_gloo_batched_p2p_prevents_silently_wrong_interleaved_pipeline():
    """PP=2 with VPP: the previous and next stage are the same rank and gloo pairs batched
    isend/irecv FIFO per peer, so activations and gradients get swapped -- no error, wrong grads."""
    bad = _train(2, dict(pp=2, vpp=2), {"gloo_batched_p2p"})
    print(f"COMPAT gloo_batched_p2p: without it -> grad norm off by {bad['grad_norm']:.2e} (relative), "
          f"loss {bad['loss']:.2e}")
    assert bad["grad_norm"] > 1e-2
    _assert_matches(_train(2, dict(pp=2, vpp=2)))


@pytest.mark.slow
@pytest.mark.quiet
def test_gloo_shape_exchange_prevents_the_mtp_standalone_vpp_deadlock():
    """MTP on its own virtual stage (pp=4, vpp=2): without the patch the interleaved schedule
    deadlocks in the shape exchange (ranks wait in _communicate_shapes for peers that are in another
    p2p call; gloo p2p waits have no timeout: the case timeout kills them and the harness reports every
    rank's stack); with it the layout trains like the single process (the fidelity case checks more).
    The patched run goes first and sets the deadlock's timeout: the same one-step run without the
    patch gets 3x its wall time (+15 s), long enough to have finished had it not deadlocked."""
    par = dict(pp=4, vpp=2, pipeline_layout="Et|t|t||t||m|L")
    ref = F.reference(SC)
    t = time.monotonic()
    _assert_matches(_train(4, par))
    patched_s = time.monotonic() - t
    with pytest.raises(RankFailure) as e:
        run_ranks(F.layout_run, 4, dict(recipe=F.case(steps=1), parallel=par, full0=ref["full0"]),
                  compat_exclude={"gloo_shape_exchange"}, pg_timeout_s=10, timeout_s=max(30, 3 * patched_s + 15),
                  grace_s=5)
    stacks = str(e.value)
    assert "still running" in stacks and "_communicate_shapes" in stacks, stacks[-3000:]
    print(f"COMPAT gloo_shape_exchange: without it -> deadlock in p2p_communication.py _communicate_shapes "
          f"(patched run {patched_s:.1f} s)")


def test_dist_opt_step_state_needed_to_resume_distributed_optimizer(tmp_path):
    ref = F.reference(SC4)

    def save_and_resume(exclude, d):
        run_ranks(R.save_run, 2, dict(recipe=SC4, parallel=dict(), full0=ref["full0"], ckpt_dir=str(d),
                                      save_at=2), compat_exclude=exclude, timeout_s=150)
        return run_ranks(R.resume_run, 2, dict(recipe=SC4, parallel=dict(), ckpt_dir=str(d), start=2, steps=2),
                         compat_exclude=exclude, timeout_s=150, grace_s=3)

    with pytest.raises(RankFailure) as e:
        save_and_resume({"dist_opt_step_state"}, tmp_path / "without")
    msg = str(e.value)
    assert "load_checkpoint" in msg and "AssertionError" in msg, msg[:2000]
    print(f"COMPAT dist_opt_step_state: without it -> resume fails: AssertionError at {_megatron_frame(msg)}")
    res = save_and_resume(frozenset(), tmp_path / "with")
    for a, b in zip(res[0]["steps"], ref["steps"][2:]):
        assert F.rel(a["loss"], b["loss"]) <= TOL and F.rel(a["grad_norm"], b["grad_norm"]) <= TOL


def test_ckpt_fork_queue_stops_reexecuting_the_training_script(tmp_path):
    """Without it the first torch_dist save starts a spawn-context Manager, which runs the user's
    script again (here it only leaves a file; a real unguarded training script would start training
    again inside the checkpoint writer)."""
    def run(exclude, d):
        d.mkdir()
        (d / "s").mkdir()
        return run_ranks(C.checkpoint_from_unguarded_script, 2,
                         dict(recipe=SC, ckpt_dir=str(d / "ckpt"), script_dir=str(d / "s")),
                         compat_exclude=exclude, timeout_s=150)

    without = run({"ckpt_fork_queue"}, tmp_path / "without")
    print(f"COMPAT ckpt_fork_queue: without it -> the script ran again: {without[0]}")
    assert without[0], "expected the unguarded script to be executed again by the spawn Manager"
    assert run(frozenset(), tmp_path / "with") == [[], []]


def test_gptmodel_deprecation_notice_is_dropped_and_nothing_else(caplog):
    """megatron-core 0.19 logs a GPTModel deprecation warning per model chunk (docs/megatron-core.md
    says why megatron-ling stays on GPTModel); other warnings of that logger still show."""
    import logging

    compat.quiet_gptmodel_deprecation()
    compat.quiet_gptmodel_deprecation()  # idempotent
    log = logging.getLogger("megatron.core.models.gpt.gpt_model")
    with caplog.at_level(logging.WARNING, logger=log.name):
        log.warning("GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes")
        log.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
    assert sum(isinstance(f, compat._DropGPTModelDeprecation) for f in log.filters) == 1


def _chat_packing(tmp_path, exclude=frozenset(), world=1, parallel=None, **kw):
    """tests.support.sft.packing_rank (rank 0's result) on 12 generated conversations: the same set
    packed and one per sequence."""
    from megatron_ling.data.chat import preprocess_chat
    from tests.support import sft as S

    if not (tmp_path / "c.bin").exists():
        S.make_chat_tokenizer(str(tmp_path / "tok"))
        S.write_conversations(str(tmp_path / "c.jsonl"), 12, seed=5)
        preprocess_chat([str(tmp_path / "c.jsonl")], str(tmp_path / "c"), str(tmp_path / "tok"), 160, progress=False)
    return run_ranks(S.packing_rank, world, dict(parallel=parallel or {}, prefix=str(tmp_path / "c"),
                                                 seq_length=160, mbs={"True": 1, "False": 1}, normalization="token",
                                                 **kw),
                     compat_exclude=exclude, timeout_s=300, grace_s=3)[0]


def test_expert_bias_padding_mask_lets_chat_data_route(tmp_path):
    """Chat samples hand GPTModel a padding_mask (tokens outside the loss); with the expert bias on,
    megatron-core's _apply_expert_bias broadcasts it against the expert dimension."""
    _expect_failure("expert_bias_padding_mask", lambda: _chat_packing(tmp_path, {"expert_bias_padding_mask"}),
                    "must match the size of tensor")
    assert _chat_packing(tmp_path)[True]["reports"]


def test_sp_padding_mask_later_stages_lets_chat_data_run_at_tp_sp_pp(tmp_path):
    """At TP2+SP x PP2 the second stage's routers get megatron-core's unscattered [b, s] padding_mask
    against s/2 local tokens. With the patch the same run is exact: test_sft.py's tp2sp-pp2 case."""
    _expect_failure("sp_padding_mask_later_stages",
                    lambda: _chat_packing(tmp_path, {"sp_padding_mask_later_stages"}, world=4,
                                          parallel=dict(tp=2, sp=True, pp=2)),
                    "must match the size of tensor")


_SHARE_STORAGE_PROBE = r"""
import torch
import torch.utils.cpp_extension
from megatron.core.tensor_parallel import random as mr
from megatron_ling import compat

def no_compiling(*a, **k):
    raise RuntimeError("COMPILES " + k.get("name", "?"))

mr.load_inline = no_compiling  # what megatron-core calls at the first selective-recompute backward
try:
    mr._get_share_storage()
    print("unpatched: no extension")
except RuntimeError as e:
    print("unpatched:", e)
compat.PATCHES["recompute_share_storage"].apply()
share = mr._get_share_storage()
out = torch.arange(6.0)
view = out.view(2, 3)
out.untyped_storage().resize_(0)  # megatron frees the checkpointed output's storage
share(out, torch.arange(6.0) * 2)
print("patched:", view.flatten().tolist())
"""


def test_recompute_share_storage_replaces_the_compiled_extension():
    """On 0.19 selective recompute JIT-compiles a C++ extension (load_inline, minutes on this CPU;
    a rank killed while compiling leaves a lock that hangs every later run): without the patch the
    first backward compiles; with it, the freed output storage is refilled in place, so views of the
    output see the recomputed values, as the extension's pointer swap does. 0.16 has no extension."""
    import subprocess
    import sys

    from megatron.core.tensor_parallel import random as mr

    if not hasattr(mr, "_get_share_storage"):
        assert not compat.PATCHES["recompute_share_storage"].applies_to_installed()
        return
    r = subprocess.run([sys.executable, "-c", _SHARE_STORAGE_PROBE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "unpatched: COMPILES share_storage_ext" in r.stdout, r.stdout
    assert "patched: [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]" in r.stdout, r.stdout
