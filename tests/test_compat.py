"""Each megatron_ling.compat patch is needed: a minimal real scenario fails (or gives a wrong
result) with that one patch left out, and works with every patch in.

Patches are process-global, so every scenario runs in ranks forked by tests.support.harness from an
unpatched zygote; ``compat_exclude`` leaves the patch out in those ranks only.
"""
import re

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
OTHERS = {"gloo_batched_p2p", "dist_opt_step_state", "ckpt_fork_queue"}


def test_every_patch_has_a_scenario():
    assert set(compat.PATCHES) == set(CRASHES) | OTHERS, sorted(set(compat.PATCHES) ^ (set(CRASHES) | OTHERS))


@pytest.mark.parametrize("name", sorted(CRASHES))
def test_patch_prevents_a_crash(name):
    world, parallel, options, needle = CRASHES[name]
    _expect_failure(name, lambda: _train(world, parallel, {name}, options), needle)
    _assert_matches(_train(world, parallel, frozenset(), options))


def test_gloo_batched_p2p_prevents_silently_wrong_interleaved_pipeline():
    """PP=2 with VPP: the previous and next stage are the same rank and gloo pairs batched
    isend/irecv FIFO per peer, so activations and gradients get swapped -- no error, wrong grads."""
    bad = _train(2, dict(pp=2, vpp=2), {"gloo_batched_p2p"})
    print(f"COMPAT gloo_batched_p2p: without it -> grad norm off by {bad['grad_norm']:.2e} (relative), "
          f"loss {bad['loss']:.2e}")
    assert bad["grad_norm"] > 1e-2
    _assert_matches(_train(2, dict(pp=2, vpp=2)))


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
