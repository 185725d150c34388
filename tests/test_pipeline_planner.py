"""Cost model, layout planner and ling-plan CLI (pure Python, no processes)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from megatron_ling.errors import LingConfigError
from megatron_ling.models.config import get_preset
from megatron_ling.models.params import _attention, _layer
from megatron_ling.parallel.config import ParallelConfig
from megatron_ling.parallel.layout import check_layout
from megatron_ling.pipeline.costmodel import Calibration, CostModel, CostOptions
from megatron_ling.pipeline.planner import (all_layouts, counts_to_layout, evaluate_layout, even_counts, plan,
                                             plan_layout)


# --------------------------------------------------------------------------- cost model
@pytest.mark.parametrize("preset", ["ling-mini-2.0", "ling-1t", "ling-small"])
def test_layer_flops_are_twice_the_active_matmul_params(preset):
    """Forward FLOPs per token of a layer = 2 x its active matmul weights (params.py) + the
    causal attention core; the MTP transformer part adds eh_proj; logits are 2 x H x V."""
    c = get_preset(preset)
    cm = CostModel(c, CostOptions(seq_length=1024))
    core = 2 * 1024 * c.num_attention_heads * c.head_dim
    norms = 2 * c.hidden_size + (2 * c.head_dim if c.use_qk_norm else 0)
    dense = _layer(c, moe=False)[0] - norms
    moe = _layer(c, moe=True)[1] - norms
    assert cm.flops_per_token("D") == pytest.approx(2 * dense + core, rel=1e-9)
    assert cm.flops_per_token("M") == pytest.approx(2 * moe + core, rel=1e-9)
    assert cm.flops_per_token("MTP_T") - cm.flops_per_token("M") == 2 * 2 * c.hidden_size ** 2
    assert cm.flops_per_token("L") == 2 * c.hidden_size * c.vocab_size + 5 * c.vocab_size  # + softmax/CE
    assert _attention(c) > 0


def test_cost_model_parallel_scaling_and_recompute():
    c = get_preset("ling-1t")
    base = CostModel(c, CostOptions(seq_length=4096)).unit("M")
    tp2 = CostModel(c, CostOptions(seq_length=4096, tp=2)).unit("M")
    cp2 = CostModel(c, CostOptions(seq_length=4096, cp=2)).unit("D")
    ep8 = CostModel(c, CostOptions(seq_length=4096, ep=8)).unit("M")
    rec = CostModel(c, CostOptions(seq_length=4096, recompute="full")).unit("M")
    mtp = CostModel(c, CostOptions(seq_length=4096, recompute="mtp"))
    assert tp2.fwd_flops == pytest.approx(base.fwd_flops / 2)
    assert tp2.act_bytes == pytest.approx(base.act_bytes / 2)
    assert cp2.fwd_flops < CostModel(c, CostOptions(seq_length=4096)).unit("D").fwd_flops / 2 + 1
    assert ep8.param_bytes < base.param_bytes / 4 and ep8.comm_s > 0 and base.comm_s == 0
    assert rec.bwd_flops == pytest.approx(3 * base.fwd_flops) and rec.act_bytes < base.act_bytes / 10
    # partial recompute: MTP transformer recomputed, its logits kept
    assert mtp.unit("MTP_T").bwd_flops == pytest.approx(3 * mtp.unit("MTP_T").fwd_flops)
    assert mtp.unit("MTP_L").bwd_flops == pytest.approx(2 * mtp.unit("MTP_L").fwd_flops)
    assert mtp.unit("MTP_L").act_bytes > 4 * c.vocab_size * 4096 * 0.99


def test_calibration_scales_by_flops_and_round_trips(tmp_path):
    c = get_preset("ling-small")
    ref = CostModel(c, CostOptions(seq_length=128))
    units = {k: {"fwd_s": 0.01 * (i + 1), "bwd_s": 0.02 * (i + 1), "fwd_flops": ref.unit(k).fwd_flops,
                 "bwd_flops": ref.unit(k).bwd_flops} for i, k in enumerate(["E", "D", "M", "MTP_T", "L"])}
    cal = Calibration(units=units, p2p_latency_s=1e-3)
    path = tmp_path / "cal.json"
    cal.save(str(path))
    with pytest.raises(LingConfigError, match="--force"):
        cal.save(str(path))
    cal2 = Calibration.load(str(path))
    same = CostModel(c, CostOptions(seq_length=128), calibration=cal2)
    assert same.unit("M").fwd_s == pytest.approx(0.03) and same.unit("L").bwd_s == pytest.approx(0.10)
    assert same.unit("MTP_L").fwd_s == pytest.approx(0.05)  # same computation as L
    assert same.p2p_latency_s == 1e-3
    double = CostModel(c, CostOptions(seq_length=128, micro_batch_size=2), calibration=cal2)
    assert double.unit("D").fwd_s == pytest.approx(0.04)  # twice the tokens, twice the time
    (tmp_path / "bad.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(LingConfigError, match="ling-plan calibrate"):
        Calibration.load(str(tmp_path / "bad.json"))
    with pytest.raises(LingConfigError, match="does not exist"):
        Calibration.load(str(tmp_path / "none.json"))


# ------------------------------------------------------------------------------ planner
SMALL = get_preset("ling-small")  # 6 layers: 1 dense, 5 MoE, MTP; vocab 4096
OPTS = CostOptions(seq_length=512, micro_batch_size=2)


@pytest.mark.parametrize("pp,vpp,m", [(2, 1, 4), (3, 1, 6), (2, 2, 4), (4, 1, 8)])
def test_planner_matches_exhaustive_search(pp, vpp, m):
    res = plan(SMALL, pp, vpp, m, OPTS)
    best = min(evaluate_layout(SMALL, counts_to_layout(c, 1), pp, m, OPTS).iteration_s
               for c in all_layouts(SMALL, pp, vpp))
    assert res.best.iteration_s <= best * 1.01
    assert res.best.iteration_s <= res.uniform.iteration_s
    check_layout(res.best.layout, pp, 6, 1, vpp)


def test_planner_memory_cap():
    c = get_preset("ling-1t", num_hidden_layers=18, first_k_dense_replace=3)
    opts = CostOptions(seq_length=4096, ep=8, dp=16)
    free = plan(c, 5, 1, 20, opts)
    peak = max(free.best.rank_mem_bytes) / 2 ** 30
    capped = plan(c, 5, 1, 20, opts, mem_cap_gib=peak * 0.9)
    assert max(capped.best.rank_mem_bytes) / 2 ** 30 <= peak * 0.9
    assert capped.best.iteration_s >= free.best.iteration_s
    with pytest.raises(LingConfigError, match="--mem-cap: no layout"):
        plan(c, 5, 1, 20, opts, mem_cap_gib=1.0)


def test_planner_bad_inputs():
    with pytest.raises(LingConfigError, match="--pp: pp=9 is larger than the 7 scheduling units"):
        plan(get_preset("ling-tiny"), 9, 1, 16, OPTS)
    with pytest.raises(LingConfigError, match="micro-batches"):
        plan(SMALL, 4, 2, 2, OPTS)
    with pytest.raises(LingConfigError, match="places 5 decoder layers"):
        evaluate_layout(SMALL, "Ett|tttmL", 2, 4, OPTS)


def test_plan_layout_api_for_the_trainer():
    lay = plan_layout(SMALL, ParallelConfig(pp=2, vpp=2), seq_length=512, micro_batch_size=2, num_microbatches=4)
    check_layout(lay, 2, SMALL.num_hidden_layers, SMALL.num_nextn_predict_layers, 2)
    assert lay == plan(SMALL, 2, 2, 4, OPTS).best.layout


def test_even_counts():
    assert even_counts(80, 42) == [2] * 38 + [1] * 4
    assert even_counts(6, 4) == [2, 2, 1, 1]
    assert counts_to_layout([2, 0, 1], 1) == "Ett||tmL"
    assert counts_to_layout([2, 1, 0], 1, mtp_standalone=True) == "Ett|tm|L"


@pytest.mark.quiet
def test_ling1t_pp21_vpp2_plans_in_seconds():
    """The paper's setting (FACTS §4): 80 layers over 42 virtual stages. MTP with the loss: ~15%
    less simulated iteration time than the uniform split; with the MTP layer on its own virtual
    stage (Ling 2.0's scheduler; runs since compat's gloo_shape_exchange, verified in
    tests/test_parallel_fidelity.py) >= 30%, and the planner picks that by itself.
    See docs/pipeline.md."""
    c = get_preset("ling-1t")
    opts = CostOptions(seq_length=4096, ep=8, dp=12, recompute="full")
    t = time.time()
    stock = plan(c, 21, 2, 84, opts, mtp_standalone=False)
    took = time.time() - t
    assert took < 10
    check_layout(stock.best.layout, 21, 80, 1, 2)
    assert 0.12 <= stock.gain <= 0.20
    auto = plan(c, 21, 2, 84, opts)  # tries both placements: standalone MTP runs with vpp > 1
    assert auto.best.layout.endswith("m|L")
    check_layout(auto.best.layout, 21, 80, 1, 2)  # a runnable plan, not a what-if
    assert auto.gain >= 0.30
    assert auto.uniform.layout == stock.uniform.layout
    assert auto.best.iteration_s < stock.best.iteration_s


def test_ling1t_pp21_without_vpp_reaches_30_percent_and_vpp2_standalone_beats_it():
    """Without virtual stages the best plan for Ling-1T at PP=21 is >= 30% below its uniform split;
    the VPP=2 plan with MTP on its own virtual stage is faster still."""
    c = get_preset("ling-1t")
    opts = CostOptions(seq_length=4096, ep=8, dp=12, recompute="full")
    auto = plan(c, 21, 1, 84, opts)
    stock = plan(c, 21, 1, 84, opts, mtp_standalone=False)
    alone = plan(c, 21, 1, 84, opts, mtp_standalone=True)
    assert auto.best.iteration_s == min(stock.best.iteration_s, alone.best.iteration_s)
    for res in (stock, alone):  # both placements are runnable without VPP: validated layouts
        check_layout(res.best.layout, 21, 80, 1, 1)
    assert alone.best.layout.endswith("m|L")
    assert auto.gain >= 0.30
    vpp2 = plan(c, 21, 2, 84, opts, mtp_standalone=True)
    assert vpp2.best.iteration_s < auto.best.iteration_s


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "megatron_ling.profiling.plan_cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_layout_and_errors(tmp_path):
    p = _cli("layout", "--preset", "ling-small", "--pp", "2", "--vpp", "2", "--micro-batches", "4",
             "--seq-length", "512", "--mbs", "2")
    assert p.returncode == 0, p.stderr
    assert "pipeline_model_parallel_layout:" in p.stdout and "uniform split" in p.stdout and "% less" in p.stdout
    p = _cli("layout", "--preset", "ling-small", "--pp", "2", "--micro-batches", "4", "--json")
    d = json.loads(p.stdout)
    assert d["iteration_s"] <= d["uniform_iteration_s"] and "|" in d["layout"]
    for args, msg in [
        (["--pp", "9", "--preset", "ling-tiny"], "error: --pp: pp=9 is larger than the 7 scheduling units"),
        (["--pp", "2", "--evaluate", "Ett|tttmL"], "error: parallel.pipeline_layout:"),
        (["--pp", "2", "--calibration", str(tmp_path / "x.json")], "error: --calibration:"),
        (["--pp", "2", "--set", "hidden_size=-1"], "error: model.hidden_size"),
    ]:
        base = ["layout", "--preset", "ling-small", "--micro-batches", "4"]
        p = _cli(*(base + args))
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert p.stderr.startswith(msg) and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_report_example_3d_15m_mtp_pp5():
    """The report's '3 D + 15 M + 1 MTP over PP=5' (Ling-1T shapes): ~27% less simulated time
    than the uniform split (docs/pipeline.md)."""
    c = get_preset("ling-1t", num_hidden_layers=18, first_k_dense_replace=3)
    res = plan(c, 5, 1, 20, CostOptions(seq_length=4096, ep=8, dp=12, recompute="full"))
    assert res.uniform.layout == "Etttt|tttt|tttt|ttt|tttmL"
    assert 0.22 <= res.gain <= 0.32
    assert max(res.best.bubbles) < max(res.uniform.bubbles)
