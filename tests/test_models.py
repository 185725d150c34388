"""Ling config, presets, HF config round trip, analytic parameter counts."""
import json

import pytest

from megatron_ling.errors import LingConfigError
from megatron_ling.models.config import PRESETS, LingConfig, get_preset
from megatron_ling.models.params import count_parameters
from tests.support.harness import run_ranks


def sig3(x: float) -> str:
    return f"{x:.3g}"


def test_mini_counts_match_published_figures():
    c = count_parameters(get_preset("ling-mini-2.0"))
    assert sig3(c.total / 1e9) == "16.3"  # 16.26B published
    assert abs(c.total / 1e9 - 16.26) < 0.005
    assert sig3(c.active / 1e9) == "1.43"
    assert sig3(c.active_non_embedding / 1e6) == "789"


@pytest.mark.parametrize("preset,total,active,tol", [
    ("ling-flash-2.0", 103e9, 6.1e9, 0.01),
    ("ling-1t", 1e12, 51e9, 0.005),
])
def test_large_presets_land_on_published_sizes(preset, total, active, tol):
    c = count_parameters(get_preset(preset))
    assert abs(c.total / total - 1) < tol, c.total
    assert abs(c.active / active - 1) < tol, c.active


def test_mtp_adds_one_moe_layer_and_projection():
    cfg = get_preset("ling-mini-2.0")
    without, with_ = count_parameters(cfg), count_parameters(cfg, include_mtp=True)
    extra = with_.total - without.total
    assert 0.80e9 < extra < 0.86e9  # FACTS: mini's MTP layer adds ~0.83B


def _count_built(ctx, preset):
    from megatron_ling.models.options import ModelOptions
    from megatron_ling.parallel.config import ParallelConfig
    from megatron_ling.training.setup import build_model, init_model_parallel

    init_model_parallel(ParallelConfig(), get_preset(preset))
    b = build_model(get_preset(preset), ParallelConfig(), ModelOptions(), ddp=False)
    return sum(p.numel() for p in b.unwrapped[0].parameters())


@pytest.mark.parametrize("preset", ["ling-tiny", "ling-small"])
def test_analytic_count_equals_built_model(preset):
    built = run_ranks(_count_built, world=1, kwargs=dict(preset=preset), timeout_s=120)[0]
    assert built == count_parameters(get_preset(preset), include_mtp=True).total


@pytest.mark.parametrize("preset", list(PRESETS))
def test_hf_config_round_trip(preset, tmp_path):
    cfg = get_preset(preset)
    path = tmp_path / "config.json"
    cfg.save_hf_config(str(path))
    d = json.loads(path.read_text())
    assert d["architectures"] == ["BailingMoeV2ForCausalLM"]
    assert d["num_nextn_predict_layers"] == 1 and d["partial_rotary_factor"] == 0.5
    back = LingConfig.from_hf_config(str(tmp_path))
    assert back == cfg
    # a third-party reader (the HF reference implementation's config class) agrees on the shape
    from nemo_automodel.components.models.ling_v2 import BailingMoeV2Config

    ref = BailingMoeV2Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    for k in ("hidden_size", "num_hidden_layers", "num_experts", "first_k_dense_replace", "n_group",
              "topk_group", "moe_intermediate_size", "num_key_value_heads", "head_dim"):
        assert getattr(ref, k) == getattr(cfg, k), k
    assert ref.partial_rotary_factor == cfg.partial_rotary_factor


def test_hf_config_keeps_unknown_keys_and_reads_rotary_dim(tmp_path):
    d = get_preset("ling-1t").to_hf_dict()
    d.pop("partial_rotary_factor")
    d["rotary_dim"] = 64
    d["auto_map"] = {"AutoConfig": "configuration_bailing_moe_v2.BailingMoeV2Config"}
    cfg = LingConfig.from_hf_dict(d)
    assert cfg.partial_rotary_factor == 0.5
    assert cfg.to_hf_dict()["auto_map"] == d["auto_map"]


@pytest.mark.parametrize("override,field", [
    (dict(num_key_value_heads=3), "model.num_key_value_heads"),
    (dict(n_group=3), "model.n_group"),
    (dict(num_experts_per_tok=5), "model.num_experts_per_tok"),
    (dict(score_function="softmax"), "model.score_function"),
    (dict(first_k_dense_replace=99), "model.first_k_dense_replace"),
])
def test_bad_model_config_is_one_line(override, field):
    with pytest.raises(LingConfigError) as e:
        get_preset("ling-tiny").replace(**override).validate()
    assert str(e.value).startswith(field) and "\n" not in str(e.value)


def test_unknown_preset():
    with pytest.raises(LingConfigError, match="model.preset: unknown preset 'ling-2t'"):
        get_preset("ling-2t")


def test_ling_params_cli(capsys):
    from megatron_ling.models.cli import main

    assert main(["--preset", "ling-mini-2.0"]) == 0
    out = capsys.readouterr().out
    assert "16.3B" in out and "1.43B" in out
