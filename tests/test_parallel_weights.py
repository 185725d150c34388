"""tests.support.weights: one full set of Ling weights into any layout and back."""
import pytest
import torch

from tests.support.weights import ShardInfo, WeightMappingError, assemble, shard_tensor, unshard_tensor
from tests.support.harness import RankFailure, run_ranks
from tests.support import fidelity as F
from tests.support import probes as P

SC = F.case(steps=1)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dim", [0, 1])
def test_shard_unshard_roundtrip(stride, dim):
    full = torch.arange(8 * 12, dtype=torch.float32).reshape(8, 12)
    parts = [shard_tensor(full, ShardInfo(dim, stride, r, 2)) for r in range(2)]
    assert all(p.shape[dim] == full.shape[dim] // 2 for p in parts)
    assert torch.equal(unshard_tensor(parts, dim, stride), full)


def test_swiglu_fc1_stride2_gives_each_rank_gate_and_up():
    gate, up = torch.zeros(4, 3), torch.ones(4, 3)
    fc1 = torch.cat([gate, up])  # megatron linear_fc1 at TP1: [gate; up]
    r0 = shard_tensor(fc1, ShardInfo(0, 2, 0, 2))
    assert torch.equal(r0, torch.cat([gate[:2], up[:2]]))  # [gate_0; up_0]


def test_assemble_detects_diverged_replicas():
    a = ("x.weight", None, torch.zeros(3))
    b = ("x.weight", None, torch.tensor([0.0, 1e-7, 0.0]))
    with pytest.raises(AssertionError, match=r"x.weight: two ranks hold different values \(max \|diff\| 1.000e-07"):
        assemble([a, b])
    assert torch.equal(assemble([a, b], check_replicas=False)["x.weight"], torch.zeros(3))
    with pytest.raises(WeightMappingError, match=r"y: shards \[1\] of 2 were not found"):
        assemble([("y", ShardInfo(0, 1, 0, 2), torch.zeros(2))])


ROUNDTRIP = [
    ("tp2_pp2", 4, dict(tp=2, pp=2)),
    ("ep2_pp2_vpp2", 4, dict(ep=2, pp=2, vpp=2)),
    ("tp2_ep2_etp1", 2, dict(tp=2, ep=2, etp=1)),
    ("pp4_layout", 4, dict(pp=4, pipeline_layout="E|tt|t|tmL")),
]


@pytest.mark.parametrize("name,world,parallel", ROUNDTRIP, ids=[c[0] for c in ROUNDTRIP])
def test_full_to_layout_and_back_is_exact(name, world, parallel):
    full = F.reference(SC)["full0"]
    res = run_ranks(P.weights_roundtrip, world, dict(recipe=SC, parallel=parallel, full=full), timeout_s=120)
    back = res[0]["full"]
    assert set(back) == set(full)
    for k in full:
        assert back[k].dtype == full[k].dtype and torch.equal(back[k], full[k]), k
    # together the ranks hold every tensor; no rank holds everything (it is really sharded)
    union = set().union(*(r["local_names"] for r in res))
    assert union == set(full)
    assert all(len(set(r["local_names"])) < len(full) for r in res)


def test_mismatched_weights_are_refused_with_the_name():
    full = F.reference(SC)["full0"]
    wrong = dict(full)
    k = "decoder.layers.1.mlp.router.weight"
    wrong[k] = torch.zeros(16, full[k].shape[1])  # 16 experts instead of 8
    with pytest.raises(RankFailure, match=r"WeightMappingError: decoder.layers.1.mlp.router.weight: full tensor \(16, 64\)"):
        run_ranks(P.load_mismatched, 2, dict(recipe=SC, parallel=dict(tp=2), full=wrong), timeout_s=60, grace_s=2)
    missing = {kk: v for kk, v in full.items() if kk != k}
    with pytest.raises(RankFailure, match=r"WeightMappingError: decoder.layers.1.mlp.router.weight \(local"):
        run_ranks(P.load_mismatched, 1, dict(recipe=SC, parallel=dict(), full=missing), timeout_s=60, grace_s=2)
