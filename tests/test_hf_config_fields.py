"""The rule for HF config.json: every field of the real BailingMoeV2 config is honoured (changing
it changes what megatron-core builds), refused in one line, or listed as metadata with a reason."""
from __future__ import annotations

import dataclasses

import pytest

from megatron_ling.errors import LingConfigError
from megatron_ling.models import builder
from megatron_ling.models.config import HF_FIXED, HF_METADATA, LingConfig, get_preset
from megatron_ling.models.megatron_config import to_transformer_config

# LingConfig fields the model does not read, and why
TOKEN_IDS = {"eos_token_id": "generation metadata; training data ids come from the tokenizer",
             "pad_token_id": "generation metadata; Ling's pad == eos is never masked by id (FACTS §1)"}
# a value different from ling-tiny's that is still valid, per honoured field
CHANGED = dict(vocab_size=1024, hidden_size=96, intermediate_size=64, num_hidden_layers=5, num_attention_heads=8,
               num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-3, tie_word_embeddings=True, use_qk_norm=False,
               max_position_embeddings=1024, rope_theta=5e5, partial_rotary_factor=1.0,
               rope_scaling=dict(type="yarn", factor=2.0, original_max_position_embeddings=256),
               initializer_range=0.05, num_experts=16, num_shared_experts=0, num_experts_per_tok=2, n_group=2,
               topk_group=4, moe_intermediate_size=16, first_k_dense_replace=2, routed_scaling_factor=1.0,
               moe_router_enable_expert_bias=False, num_nextn_predict_layers=0, mtp_loss_scaling_factor=0.3)
# honoured fields whose only legal value is Ling's (others refused)
REFUSED = dict(hidden_act="gelu", use_bias=True, use_qkv_bias=True, score_function="softmax", router_dtype="bf16",
               norm_topk_prob=False)


def real_config_fields() -> set:
    """The parameters of the independent BailingMoeV2Config, plus what our export writes."""
    import inspect

    from nemo_automodel.components.models.ling_v2 import BailingMoeV2Config

    params = set(inspect.signature(BailingMoeV2Config.__init__).parameters) - {"self", "kwargs"}
    return params | set(get_preset("ling-mini-2.0").to_hf_dict())


def built(cfg: LingConfig) -> dict:
    """What megatron-core receives: the TransformerConfig and the GPTModel arguments."""
    seen = {}
    import megatron.core.models.gpt.gpt_model as gm

    class Capture:
        def __init__(self, **kw):
            seen.update({k: v for k, v in kw.items() if k not in ("config", "transformer_layer_spec", "mtp_block_spec")})
            self.rotary_pos_emb = None

    tf = to_transformer_config(cfg)
    real, gm.GPTModel = gm.GPTModel, Capture
    saved = builder.partial_yarn_embedding, builder.layer_specs
    try:  # the specs and the YaRN module need parallel state; what they read is in tf / the arguments
        builder.partial_yarn_embedding = lambda c, t: None
        builder.layer_specs = lambda t, vp_stage=None: (None, None)
        builder.build_ling_model(cfg, tf, pre_process=True, post_process=True)
    finally:
        gm.GPTModel = real
        builder.partial_yarn_embedding, builder.layer_specs = saved
    tfd = {k: v for k, v in vars(tf).items() if not callable(v)}
    return dict(tf=repr(sorted(tfd.items(), key=str)), model=repr(sorted(seen.items())))


def test_every_real_field_is_classified():
    ling = {f.name for f in dataclasses.fields(LingConfig)} - {"extra"}
    derived = {"rotary_dim", "moe_shared_expert_intermediate_size"}
    for k in real_config_fields():
        assert k in ling or k in derived or k in HF_METADATA or k in HF_FIXED, k
    assert set(CHANGED) | set(REFUSED) | set(TOKEN_IDS) == ling
    assert all(len(reason) > 20 for reason in {**HF_METADATA, **TOKEN_IDS}.values())


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_honoured_field_changes_the_model(name):
    base = get_preset("ling-tiny")
    changed = base.replace(**{name: CHANGED[name]}).validate()
    assert built(changed) != built(base), f"{name} does not reach megatron-core"


@pytest.mark.parametrize("name", sorted(REFUSED) + sorted(HF_FIXED) + ["no_such_field"])
def test_other_values_are_refused_in_one_line(name):
    d = get_preset("ling-tiny").to_hf_dict()
    d[name] = REFUSED[name] if name in REFUSED else (not HF_FIXED[name][0]) if name in HF_FIXED and \
        isinstance(HF_FIXED[name][0], bool) else 0.1
    with pytest.raises(LingConfigError) as e:
        LingConfig.from_hf_dict(d).validate()
    assert name in str(e.value) and "\n" not in str(e.value)


def test_metadata_round_trips_unchanged():
    d = get_preset("ling-tiny").to_hf_dict()
    d.update(auto_map={"AutoConfig": "x.Y"}, use_cache=False, max_window_layers=3, torch_dtype="bfloat16")
    out = LingConfig.from_hf_dict(d).to_hf_dict()
    assert all(out[k] == d[k] for k in ("auto_map", "use_cache", "max_window_layers", "torch_dtype"))


def test_released_ling_keys_at_their_value_are_accepted():
    """Released Ling 2.0 config.json files carry the HF_FIXED keys at their one supported value
    (e.g. Ling-1T's using_split_qkv_in_self_attention=false): accepted, nothing else changes."""
    base = get_preset("ling-tiny")
    d = base.to_hf_dict()
    d.update({k: want for k, (want, _) in HF_FIXED.items()})
    assert LingConfig.from_hf_dict(d).validate() == base
