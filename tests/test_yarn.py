"""HF ``rope_scaling`` YaRN: megatron-ling trains with megatron-core's YaRN (partial rotary kept)
and matches an independent YaRN -- transformers' own ``ROPE_INIT_FUNCTIONS['yarn']`` (inverse
frequencies and attention factor) driving NeMo-AutoModel's BailingMoeV2 forward -- on logits at
positions beyond the original context."""
from __future__ import annotations

import pytest
import torch

from tests.support.synthetic import layout_forward, save_megatron_checkpoint
from megatron_ling.convert.to_hf import to_hf
from megatron_ling.convert.verify import reference_logits, reference_model
from megatron_ling.errors import LingConfigError
from megatron_ling.models.config import get_preset

TOL = 1e-5
ORIG = 32  # original context; the test sequence (96 tokens) runs three times past it
# head_dim 32 (16 rotary channels = 8 frequencies) so YaRN's ramp has room between its bounds
BASE = get_preset("ling-tiny", initializer_range=0.1, head_dim=32, max_position_embeddings=128)

CASES = {
    "factor_only": dict(type="yarn", factor=4.0, original_max_position_embeddings=ORIG),
    "mscale_ratio": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=ORIG,
                         mscale=1.0, mscale_all_dim=0.5, beta_fast=16, beta_slow=2),
    "attention_factor_untruncated": dict(type="yarn", factor=4.0, original_max_position_embeddings=ORIG,
                                         attention_factor=1.3, truncate=False),
}


def hf_yarn(cfg):
    """(inverse frequencies, attention factor) from transformers' rope utilities."""
    from transformers import PretrainedConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hc = PretrainedConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                          head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
                          rope_parameters=dict(cfg.rope_scaling, rope_type="yarn", rope_theta=cfg.rope_theta,
                                               partial_rotary_factor=cfg.partial_rotary_factor))
    return ROPE_INIT_FUNCTIONS["yarn"](hc, "cpu")


def hf_reference_logits(hf_dir, cfg, ids):
    model = reference_model(hf_dir)
    inv_freq, attention_factor = hf_yarn(cfg)
    assert inv_freq.numel() == cfg.rotary_dim // 2  # partial rotary: frequencies of the rotated half
    # NeMo's rotary module asks this method for (concentration, inv_freq): answer with transformers'.
    model.model.rotary_emb._compute_concentration_and_inv_freq = lambda: (attention_factor, inv_freq)
    return reference_logits(model, ids)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("yarn")


@pytest.mark.parametrize("case", list(CASES))
def test_yarn_matches_transformers_beyond_original_context(work, case):
    cfg = BASE.replace(rope_scaling=CASES[case])
    ckpt = save_megatron_checkpoint(cfg, str(work / f"ckpt_{case}"), {}, 1, seed=3)
    hf_dir = str(work / f"hf_{case}")
    to_hf(ckpt, hf_dir, dtype="fp32", show_progress=False)
    ids = torch.randint(0, cfg.vocab_size, (2, 3 * ORIG), generator=torch.Generator().manual_seed(0))
    ours, _ = layout_forward(ckpt, cfg, {}, 1, ids)
    ref = hf_reference_logits(hf_dir, cfg, ids)
    diff = (ours - ref).abs().max().item()
    print(f"{case}: max |delta logits| = {diff:.2e}")
    assert diff <= TOL
    # the check can fail: the same weights under plain RoPE differ beyond the original context
    plain = layout_forward(ckpt, cfg.replace(rope_scaling=None), {}, 1, ids)[0]
    assert (plain - ref)[:, ORIG:].abs().max().item() > 1e-2


@pytest.mark.parametrize("rs, field", [
    (dict(type="linear", factor=2.0), "model.rope_scaling: rope scaling type 'linear'"),
    (dict(rope_type="dynamic", factor=2.0), "model.rope_scaling: rope scaling type 'dynamic'"),
    (dict(type="yarn", factor=4.0, low_freq_factor=1), "model.rope_scaling.low_freq_factor"),
    (dict(type="yarn", factor=1.0), "model.rope_scaling.factor"),
    (dict(type="yarn", factor="abc"), "model.rope_scaling.factor"),
    (dict(type="yarn", factor=4.0, original_max_position_embeddings=-1),
     "model.rope_scaling.original_max_position_embeddings"),
    ("yarn", "model.rope_scaling: expected"),
])
def test_other_scaling_is_refused_in_one_line(rs, field):
    with pytest.raises(LingConfigError) as e:
        BASE.replace(rope_scaling=rs).validate()
    assert str(e.value).startswith(field) and "\n" not in str(e.value)


def test_calibration_runs_with_yarn(tmp_path):
    """ling-plan calibrate times the real layers of a YaRN model (its rotary module returns
    (embedding, mscale), not a tensor). Run as the user runs it, in its own process: forking this
    test process, which has run torch's thread pools, can hang the child."""
    import os
    import subprocess
    import sys

    from megatron_ling.pipeline.costmodel import Calibration

    BASE.replace(rope_scaling=CASES["factor_only"]).validate().save_hf_config(str(tmp_path / "config.json"))
    out = str(tmp_path / "cal.json")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "megatron_ling.profiling.plan_cli", "calibrate", "--hf-config",
                        str(tmp_path / "config.json"), "--seq-length", "64", "--mbs", "1", "--reps", "1", "--out", out],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=root))
    assert r.returncode == 0, r.stderr[-2000:]
    cal = Calibration.load(out)
    assert {"E", "D", "M", "L"} <= set(cal.units) and all(u["fwd_s"] > 0 for u in cal.units.values())
