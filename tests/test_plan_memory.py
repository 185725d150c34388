"""ling-plan memory: the per-rank estimate against the tensors a real 2-rank CPU training step
allocates (megatron-core model, DDP grad buffers, Megatron optimizer state)."""
from __future__ import annotations

import pytest
import torch

from tests.support.harness import run_ranks

LAYOUTS = {
    "tp2-ep2-distopt-fp32": [],  # the quick-start layout
    "pp2-adam-fp32": ["parallel.tp=1", "parallel.ep=1", "parallel.etp=null", "parallel.pp=2",
                      "parallel.distributed_optimizer=false"],
}


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() > 1:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def measured_rank(ctx, overrides):
    """Rank function: the trainer's model + optimizer for the quick-start recipe, one real step on
    random tokens, then the bytes held by parameters, gradient buffers and optimizer state."""
    from megatron.core import parallel_state as ps

    from megatron_ling.training.recipe import load_recipe
    from megatron_ling.training.setup import build_model, build_optimizer, init_model_parallel
    from megatron_ling.training.step import train_step

    r = load_recipe("quickstart", ["training.seq_length=32", "training.micro_batch_size=2",
                                   "training.global_batch_size=4", *overrides])
    ling = r.model.ling_config()
    init_model_parallel(r.parallel, ling, 1234)
    bundle = build_model(ling, r.parallel, r.model.options())
    o = r.optimizer
    opt = build_optimizer(bundle, r.parallel, r.model.options(), lr=o.lr)
    s, b = r.training.seq_length, r.training.micro_batch_size
    g = torch.Generator().manual_seed(0)
    nmb = r.num_microbatches(ctx.world)
    mbs = [dict(tokens=(x := torch.randint(0, ling.vocab_size, (b, s), generator=g)), labels=x.roll(-1, 1),
                loss_mask=torch.ones(b, s), position_ids=torch.arange(s).expand(b, s)) for _ in range(nmb)]
    train_step(bundle, opt, mbs, s, b)
    params = _storage_bytes(p for c in bundle.unwrapped for p in c.parameters())
    grads = _storage_bytes(buf.grad_data for c in bundle.chunks
                           for buf in list(c.buffers) + list(c.expert_parallel_buffers))
    inner = [x.optimizer for x in getattr(opt, "chained_optimizers", [opt])]
    state = [v for o_ in inner for st in o_.state.values() for v in st.values()]
    optim = _storage_bytes(state)
    pp_rank = ps.get_pipeline_model_parallel_rank()
    ps.destroy_model_parallel()
    return dict(pp_rank=pp_rank, params=params, grads=grads, optimizer=optim)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_memory_estimate_within_15_percent_of_a_real_run(name):
    from megatron_ling.scaling.memory import estimate_memory
    from megatron_ling.training.recipe import load_recipe

    overrides = LAYOUTS[name]
    est = estimate_memory(load_recipe("quickstart", ["training.seq_length=32", "training.micro_batch_size=2",
                                                     "training.global_batch_size=4", *overrides]), 2)
    got = run_ranks(measured_rank, 2, dict(overrides=overrides), timeout_s=300)
    for m in got:
        e = est[m["pp_rank"]]
        print(f"MEMORY {name} pp_rank {m['pp_rank']}: params+optimizer estimate {e.param_bytes + e.optimizer_bytes:.0f} "
              f"measured {m['params'] + m['optimizer']} B; grads estimate {e.grad_bytes:.0f} measured {m['grads']} B")
        assert m["optimizer"] > 0 and m["params"] > 0
        assert e.param_bytes + e.optimizer_bytes == pytest.approx(m["params"] + m["optimizer"], rel=0.15), (e, m)
        assert e.grad_bytes == pytest.approx(m["grads"], rel=0.15), (e, m)
