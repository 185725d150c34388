"""Ling's zero-mean expert-bias update and the fp32 expert bias."""
import torch

from megatron_ling.models.expert_bias import zero_mean_bias_update


def test_zero_mean_update_sums_to_zero_and_follows_formula():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 100, (3, 16), generator=g).float()
    bias = torch.randn(3, 16, generator=g)
    upd = zero_mean_bias_update(tokens, torch.zeros(3, 16), 1e-3)  # the update itself
    assert torch.allclose(upd.sum(-1), torch.zeros(3), atol=1e-8)
    s = torch.sign(tokens.mean(-1, keepdim=True) - tokens)
    assert torch.allclose(upd, 1e-3 * (s - s.mean(-1, keepdim=True)), atol=1e-9)
    new = zero_mean_bias_update(tokens, bias, 1e-3)
    assert torch.allclose(new - bias, upd, atol=1e-6) and new.dtype == torch.float32
    # Megatron's plain sign update does not keep the sum (all underloaded => all move up)
    plain = torch.sign(tokens.mean(-1, keepdim=True) - tokens) * 1e-3
    assert plain.sum(-1).abs().max() > 1e-4


def _route(scores, bias, topk=4, groups=4, topk_group=2):
    """Megatron-Core's own routing (sigmoid scores, expert bias for selection, group-limited)."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    probs, routing_map = topk_routing_with_score_function(
        scores, topk, use_pre_softmax=False, num_groups=groups, group_topk=topk_group, scaling_factor=2.5,
        score_function="sigmoid", expert_bias=bias)
    return probs, routing_map


def test_zero_mean_update_moves_load_toward_balance():
    torch.manual_seed(0)
    E, T = 16, 4096
    # skewed router logits: some experts are strongly preferred
    logits = torch.randn(T, E) + torch.linspace(2.0, -2.0, E)
    bias = torch.zeros(E)
    imbalance = []
    for _ in range(300):
        _, routing_map = _route(logits, bias)
        tokens = routing_map.sum(0).float()
        imbalance.append((tokens.max() / tokens.mean()).item())
        bias = zero_mean_bias_update(tokens, bias, 1e-2)
    assert imbalance[0] > 2.0
    assert imbalance[-1] < 0.6 * imbalance[0]
    assert abs(bias.sum().item()) < 1e-4  # zero-mean: the biases never drift together
    assert bias.dtype == torch.float32


def test_group_limited_routing_weights_normalised_and_scaled():
    torch.manual_seed(1)
    logits = torch.randn(64, 8)
    bias = torch.randn(8) * 0.1
    probs, routing_map = _route(logits, bias)
    assert (routing_map.sum(-1) == 4).all()
    # weights are the unbiased sigmoid scores of the chosen experts, normalised, times 2.5
    s = torch.sigmoid(logits)
    expect = torch.where(routing_map, s, torch.zeros_like(s))
    expect = expect / expect.sum(-1, keepdim=True) * 2.5
    assert torch.allclose(probs, expect, atol=1e-6)


def _bf16_bias_case(ctx, tmp):
    from megatron_ling.models.config import get_preset
    from megatron_ling.models.expert_bias import routers, wrap_half_precision
    from megatron_ling.models.builder import build_ling_model
    from megatron_ling.models.megatron_config import to_transformer_config
    from megatron_ling.models.options import ModelOptions
    from megatron_ling.parallel.config import ParallelConfig
    from megatron_ling.training.recipe import recipe_from_dict
    from megatron_ling.training.setup import init_model_parallel
    from megatron_ling.training.trainer import run, setup

    par = ParallelConfig()
    ling = get_preset("ling-tiny")
    init_model_parallel(par, ling)
    opts = ModelOptions(precision="bf16")
    tf = to_transformer_config(ling, par, opts)
    m = build_ling_model(ling, tf)
    value = torch.full((8,), 1e-3) + torch.arange(8) * 1.2345e-7  # not representable in bf16
    for r in routers([m]):
        r.expert_bias.copy_(value)
    w = wrap_half_precision(tf, m)
    out = {"after_wrap": [(str(r.expert_bias.dtype), bool(torch.equal(r.expert_bias, value))) for r in routers([w])],
           "weights_dtype": str(m.decoder.layers[0].self_attention.linear_qkv.weight.dtype)}
    # a bf16 training step and the trainer's checkpoint round trip (save at the end, resume) keep fp32
    recipe = recipe_from_dict(dict(run_dir=tmp, model=dict(preset="ling-tiny", precision="bf16"), data=dict(mock=True),
                                   training=dict(train_iters=1, global_batch_size=2, micro_batch_size=2, seq_length=16),
                                   optimizer=dict(lr=1e-3)))
    first = setup(recipe)
    run(first)
    out["after_step"] = sorted({str(r.expert_bias.dtype) for r in routers(first.bundle.unwrapped)})
    saved = torch.stack([r.expert_bias.clone() for r in routers(first.bundle.unwrapped)])
    resumed = setup(recipe)  # checkpoint.resume: auto
    out["after_load"] = sorted({str(r.expert_bias.dtype) for r in routers(resumed.bundle.unwrapped)})
    out["load_exact"] = bool(resumed.iteration == 1 and torch.equal(
        torch.stack([r.expert_bias for r in routers(resumed.bundle.unwrapped)]), saved))
    out["nonzero"] = bool(saved.abs().sum() > 0)
    return out


def test_expert_bias_stays_fp32_under_bf16_and_after_load(tmp_path):
    from tests.support.harness import run_ranks

    r = run_ranks(_bf16_bias_case, world=1, kwargs=dict(tmp=str(tmp_path / "ckpt")), timeout_s=400)[0]
    assert r["weights_dtype"] == "torch.bfloat16"
    assert r["after_wrap"] and all(d == "torch.float32" and exact for d, exact in r["after_wrap"])
    assert r["after_step"] == ["torch.float32"] and r["after_load"] == ["torch.float32"]
    assert r["nonzero"] and r["load_exact"]
