"""Every parallel layout computes what the single process computes (issue 3).

fp32, the ling-tiny preset (first layer dense, shared expert, group-limited sigmoid routing with
expert bias, MTP): each layout loads the single-process run's initial weights, trains 3 steps on
the same global batches (each data-parallel rank gets its share) and must match the single process:
max |d logits| <= 1e-5 on a fixed evaluation batch before and after training (every output-layer
call: MTP head and main head), per-step loss, grad norm and MTP loss within 1e-5 relative, the
expert biases identical, the final weights within 2e-4 (Adam divides by sqrt(v): for the rare
near-zero gradient, a 1e-9 reduction-order difference becomes a visible step).
Ranks are forked by tests.support.harness (gloo, 60 s process-group timeout, hard case timeout).
"""
import pytest

from megatron_ling import compat
from megatron_ling.parallel.layout import mtp_pp_ranks
from tests.support.harness import RankFailure, run_ranks
from tests.support import fidelity as F

TOL_LOGITS = 1e-5
TOL_REL = 1e-5
TOL_WEIGHTS = 2e-4
TOL_BF16_LOSS = 1e-2
SC = F.case()
CASE_TIMEOUT_S = 150


@pytest.fixture(scope="module")
def reference():
    return F.reference(SC)


def _layers(*per_rank):
    """Expected global layer numbers (1-based) per rank and chunk."""
    return [list(map(list, r)) for r in per_rank]


# name, world, ParallelConfig fields, expected process-group sizes, expected layers per rank (or None)
LAYOUTS = [
    ("tp2_sp", 2, dict(tp=2), dict(tp=2, dp=1, ep=1, etp=2), None),
    ("tp2_sp_ep2_etp1", 2, dict(tp=2, ep=2, etp=1), dict(tp=2, dp=1, ep=2, etp=1), None),
    ("ep2_allgather", 2, dict(ep=2, moe_token_dispatcher="allgather"), dict(tp=1, dp=2, ep=2), None),
    ("ep2_alltoall", 2, dict(ep=2, moe_token_dispatcher="alltoall"), dict(tp=1, dp=2, ep=2), None),
    ("pp2_1f1b", 2, dict(pp=2), dict(pp=2, dp=1), _layers([[1, 2]], [[3, 4]])),
    ("pp2_first1", 2, dict(pp=2, num_layers_in_first_pipeline_stage=1), dict(pp=2), _layers([[1]], [[2, 3, 4]])),
    ("pp2_account_emb_loss", 2, dict(pp=2, account_for_embedding_in_pipeline_split=True,
                                     account_for_loss_in_pipeline_split=True), dict(pp=2),
     _layers([[1, 2]], [[3, 4]])),
    ("pp2_layout_Et|tttmL", 2, dict(pp=2, pipeline_layout="Et|tttmL"), dict(pp=2), _layers([[1]], [[2, 3, 4]])),
    ("pp2_vpp2", 2, dict(pp=2, vpp=2), dict(pp=2), _layers([[1], [3]], [[2], [4]])),
    ("pp2_vpp2_layout_Ett|t||tmL", 2, dict(pp=2, vpp=2, pipeline_layout="Ett|t||tmL"), dict(pp=2),
     _layers([[1, 2], []], [[3], [4]])),
    ("dp2", 2, dict(distributed_optimizer=False), dict(dp=2), None),
    ("dp2_overlap_grad", 2, dict(distributed_optimizer=False, overlap_grad_reduce=True, bucket_size=4000),
     dict(dp=2), None),
    ("dp2_distopt", 2, dict(distributed_optimizer=True), dict(dp=2), None),
    ("dp2_distopt_overlap_grad_param", 2, dict(distributed_optimizer=True, overlap_grad_reduce=True,
                                               overlap_param_gather=True, bucket_size=4000), dict(dp=2), None),
    ("pp2_vpp2_distopt_overlap", 2, dict(pp=2, vpp=2, distributed_optimizer=True, overlap_grad_reduce=True,
                                         overlap_param_gather=True, bucket_size=4000), dict(pp=2), None),
    # 4 ranks
    ("pp4_layout_empty_stage", 4, dict(pp=4, pipeline_layout="Et|tt||tmL"), dict(pp=4),
     _layers([[1]], [[2, 3]], [[]], [[4]])),
    ("pp4_layout_E_alone", 4, dict(pp=4, pipeline_layout="E|tt|t|tmL"), dict(pp=4),
     _layers([[]], [[1, 2]], [[3]], [[4]])),
    ("pp4_vpp2_layout_empty", 4, dict(pp=4, vpp=2, pipeline_layout="Et||t|||t|t|mL"), dict(pp=4),
     _layers([[1], []], [[], [3]], [[2], [4]], [[], []])),
    ("tp2_ep2_etp2_allgather", 4, dict(tp=2, ep=2, moe_token_dispatcher="allgather"),
     dict(tp=2, dp=2, ep=2, etp=2), None),
    pytest.param("tp2_ep2_etp2_alltoall", 4, dict(tp=2, ep=2), dict(tp=2, dp=2, ep=2, etp=2), None,
                 marks=pytest.mark.xfail(
                     "gloo_uneven_all_gather" not in compat.PATCHES, strict=True, raises=RankFailure,
                     reason="gloo all_gather needs equal sizes; the alltoall dispatcher with ETP>1 gathers "
                            "uneven token counts over the expert-TP group (tensor_parallel/mappings.py:150); "
                            "needs a compat patch"), id="tp2_ep2_etp2_alltoall"),
    ("tp2_pp2", 4, dict(tp=2, pp=2), dict(tp=2, pp=2, dp=1), None),
    # MTP standalone: the MTP layer on another pipeline rank than the loss (Ling's heterogeneous
    # pipeline); needs megatron_ling's embedding group (the MTP stage's embedding copy joins it)
    ("pp2_mtp_with_embedding_Ettttm|L", 2, dict(pp=2, pipeline_layout="Ettttm|L"), dict(pp=2),
     _layers([[1, 2, 3, 4]], [[]])),
    ("pp3_mtp_standalone_Ett|ttm|L", 3, dict(pp=3, pipeline_layout="Ett|ttm|L"), dict(pp=3),
     _layers([[1, 2]], [[3, 4]], [[]])),
    ("pp4_mtp_standalone_Et|tt|tm|L", 4, dict(pp=4, pipeline_layout="Et|tt|tm|L"), dict(pp=4),
     _layers([[1]], [[2, 3]], [[4]], [[]])),
    ("pp4_mtp_alone_Ett|tt|m|L", 4, dict(pp=4, pipeline_layout="Ett|tt|m|L"), dict(pp=4),
     _layers([[1, 2]], [[3, 4]], [[]], [[]])),
    # MTP on its own virtual stage under VPP (Ling 2.0's scheduler; megatron-core's documented
    # 'E|t*3|(t|)*3tt|m|L' style): needs compat's gloo_shape_exchange on gloo. Layers per rank and
    # chunk: stage i is chunk i // pp of rank i % pp.
    ("pp4_vpp2_mtp_standalone_Et|t|t||t||m|L", 4, dict(pp=4, vpp=2, pipeline_layout="Et|t|t||t||m|L"),
     dict(pp=4), _layers([[1], [4]], [[2], []], [[3], []], [[], []])),
    ("pp4_vpp2_mtp_standalone_E|t|t|t||t|m|L", 4, dict(pp=4, vpp=2, pipeline_layout="E|t|t|t||t|m|L"),
     dict(pp=4), _layers([[], []], [[1], [4]], [[2], []], [[3], []])),
    ("dp2_ep2_pp2", 4, dict(pp=2, ep=2), dict(pp=2, dp=2, ep=2, tp=1), None),
]


LAYOUTS = [c if hasattr(c, "marks") else pytest.param(*c, id=c[0]) for c in LAYOUTS]


@pytest.mark.parametrize("name,world,parallel,groups,layers", LAYOUTS)
def test_layout_matches_single_process(reference, name, world, parallel, groups, layers):
    res = run_ranks(F.layout_run, world, dict(recipe=SC, parallel=parallel, full0=reference["full0"]),
                    timeout_s=CASE_TIMEOUT_S)
    for k, v in groups.items():  # the layout really is what the case claims
        assert res[0]["groups"][k] == v, (k, res[0]["groups"])
    if layers is not None:
        assert [r["layers"] for r in res] == layers
        # MTP on exactly the rank the layout puts it (the last one unless the layout says otherwise)
        pp = parallel.get("pp", 1)
        mtp_rank = (mtp_pp_ranks(parallel.get("pipeline_layout"), pp) or [pp - 1])[0]
        assert [any(r["mtp"]) for r in res] == [i == mtp_rank for i in range(len(res))]
    d = F.compare(reference, res)
    print(f"FIDELITY {name}: " + " ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in d.items()))
    assert d["n_logit_ranks"] >= 1
    assert d["logits0"] <= TOL_LOGITS and d["logits"] <= TOL_LOGITS, d
    assert d["loss"] <= TOL_REL and d["grad_norm"] <= TOL_REL and d["mtp"] <= TOL_REL, d
    assert d["tokens_ok"], d
    assert d["expert_bias"] == 0.0, d
    assert d["weights"] <= TOL_WEIGHTS, d
    # expert biases stay fp32 (ranks whose stages hold no MoE layer have none)
    assert all(r["bias_dtypes"] in ([], ["torch.float32"]) for r in res) and any(r["bias_dtypes"] for r in res)


def test_tp2_without_sp_forward_matches(reference):
    """TP2 without sequence parallelism: megatron-core refuses MoE *training* without SP (see
    test_traps), so this layout is checked for the forward pass (logits) only."""
    res = run_ranks(F.layout_run, 2, dict(recipe=SC, steps=0, parallel=dict(tp=2, sp=False),
                                          full0=reference["full0"], checks=False), timeout_s=CASE_TIMEOUT_S)
    assert res[0]["groups"]["tp"] == 2
    diff = max((r["logits0"] - reference["logits0"]).abs().max().item() for r in res)
    print(f"FIDELITY tp2_nosp_forward: logits0={diff:.2e}")
    assert diff <= TOL_LOGITS


BF16 = [
    ("bf16_single", 1, dict(distributed_optimizer=False)),
    ("bf16_dp2_distopt", 2, dict(distributed_optimizer=True)),
    ("bf16_tp2_ep2", 4, dict(tp=2, ep=2, moe_token_dispatcher="allgather")),
    ("bf16_ep2_alltoall", 2, dict(ep=2)),
    ("bf16_pp2_vpp2", 2, dict(pp=2, vpp=2)),
]


@pytest.mark.parametrize("name,world,parallel", BF16, ids=[c[0] for c in BF16])
def test_bf16_close_to_fp32(reference, name, world, parallel):
    sc = F.case(precision="bf16")
    res = run_ranks(F.layout_run, world, dict(recipe=sc, parallel=parallel, full0=reference["full0"]),
                    timeout_s=CASE_TIMEOUT_S)
    worst = 0.0
    assert any(r["bias_dtypes"] for r in res)
    for r in res:
        assert r["bias_dtypes"] in ([], ["torch.float32"]), r["bias_dtypes"]  # Megatron-LM #1482
        for a, b in zip(r["steps"], reference["steps"]):
            worst = max(worst, F.rel(a["loss"], b["loss"]), F.rel(a["mtp"], b["mtp"]))
    full = res[0]["full"]
    bias = [k for k in full if k.endswith("expert_bias")]
    assert bias and all(full[k].dtype.is_floating_point and str(full[k].dtype) == "torch.float32" for k in bias)
    print(f"FIDELITY {name}: bf16-vs-fp32 loss rel={worst:.2e}")
    assert worst <= TOL_BF16_LOSS
