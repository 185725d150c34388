"""LingConfig (+ parallel layout + run options) -> Megatron-Core TransformerConfig."""
from __future__ import annotations

import torch

from megatron_ling.errors import LingConfigError
from megatron_ling.models.config import LingConfig
from megatron_ling.models.options import ModelOptions
from megatron_ling.parallel.config import ParallelConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def te_available() -> bool:
    """Transformer Engine specs are used only with TE importable and a GPU present."""
    if not torch.cuda.is_available():
        return False
    from megatron_ling.compat import have_te

    return have_te()


def to_transformer_config(ling: LingConfig, parallel: ParallelConfig | None = None,
                          options: ModelOptions | None = None, **overrides):
    """Build Megatron's TransformerConfig. ``overrides`` are raw TransformerConfig fields
    (for experiments and tests); everything Ling-specific comes from ``ling``."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    parallel = parallel or ParallelConfig()
    options = options or ModelOptions()
    ling.validate()
    options.validate()
    dtype = _DTYPES[options.precision]
    use_te = te_available()
    grouped = use_te if options.grouped_gemm is None else options.grouped_gemm
    if grouped and not use_te:
        raise LingConfigError("model.grouped_gemm: grouped GEMM needs Transformer Engine on a GPU; "
                              "set grouped_gemm: null or false")
    if options.fp8 and not use_te:
        raise LingConfigError(f"model.fp8: FP8 ({options.fp8}) needs Transformer Engine on a GPU; set fp8: null")
    layout = parallel.pipeline_layout if parallel.pipeline_layout not in (None, "auto") else None
    moe = ling.num_moe_layers > 0
    kw = dict(
        # shape
        num_layers=ling.num_hidden_layers,
        hidden_size=ling.hidden_size,
        ffn_hidden_size=ling.intermediate_size,
        num_attention_heads=ling.num_attention_heads,
        num_query_groups=ling.num_key_value_heads,
        kv_channels=ling.head_dim,
        # block: pre-norm RMSNorm, SwiGLU, no biases, QK-norm per head before RoPE
        normalization="RMSNorm",
        layernorm_epsilon=ling.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=ling.use_qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=options.init_std if options.init_std is not None else ling.initializer_range,
        # MoE: sigmoid, group-limited, expert bias for selection only, normalised then scaled
        num_moe_experts=ling.num_experts if moe else None,
        moe_layer_freq=ling.moe_layer_freq if moe else 1,
        moe_ffn_hidden_size=ling.moe_intermediate_size if moe else None,
        moe_shared_expert_intermediate_size=(ling.num_shared_experts * ling.moe_intermediate_size
                                             if moe and ling.num_shared_experts else None),
        moe_router_topk=ling.num_experts_per_tok,
        moe_router_score_function="sigmoid",
        moe_router_num_groups=ling.n_group if moe and ling.n_group > 1 else None,
        moe_router_group_topk=ling.topk_group if moe and ling.n_group > 1 else None,
        moe_router_topk_scaling_factor=ling.routed_scaling_factor,
        moe_router_enable_expert_bias=ling.moe_router_enable_expert_bias and moe,
        moe_router_bias_update_rate=options.expert_bias_update_rate,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss" if options.aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=options.aux_loss_coeff,
        moe_z_loss_coeff=options.z_loss_coeff or None,
        moe_token_dispatcher_type=parallel.moe_token_dispatcher,
        moe_grouped_gemm=bool(grouped),
        # MTP
        mtp_num_layers=ling.num_nextn_predict_layers or None,
        mtp_loss_scaling_factor=ling.mtp_loss_scaling_factor,
        # precision
        bf16=options.precision == "bf16",
        fp16=options.precision == "fp16",
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        fp8="e4m3" if options.fp8 else None,
        fp8_recipe=options.fp8 or "delayed",
        # parallel
        **parallel.megatron_sizes(),
        sequence_parallel=parallel.sequence_parallel,
        pipeline_model_parallel_layout=layout,
        num_layers_in_first_pipeline_stage=parallel.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=parallel.num_layers_in_last_pipeline_stage,
        account_for_embedding_in_pipeline_split=parallel.account_for_embedding_in_pipeline_split,
        account_for_loss_in_pipeline_split=parallel.account_for_loss_in_pipeline_split,
        # CPU builds initialise on the CPU (and reproducibly across layouts)
        use_cpu_initialization=not torch.cuda.is_available(),
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        moe_permute_fusion=False,
        cross_entropy_loss_fusion=False,
    )
    if use_te:  # fused kernels are what users get on GPUs
        kw.update(gradient_accumulation_fusion=False, bias_activation_fusion=True, bias_dropout_fusion=True,
                  masked_softmax_fusion=True, apply_rope_fusion=True, moe_permute_fusion=True,
                  cross_entropy_loss_fusion=True, persist_layer_norm=True)
    if options.recompute == "full":
        kw.update(recompute_granularity="full", recompute_method="uniform",
                  recompute_num_layers=options.recompute_num_layers)
    elif options.recompute == "selective":
        kw.update(recompute_granularity="selective",
                  recompute_modules=options.recompute_modules or ["core_attn"])
    kw.update(overrides)
    try:
        tf = TransformerConfig(**kw)
    except (AssertionError, ValueError) as e:
        raise LingConfigError(f"parallel/model: megatron-core rejected the configuration: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    set_yarn(tf, ling)
    return tf


def set_yarn(tf_config, ling: LingConfig) -> None:
    """Put YaRN's parameters where megatron-core reads them: GPTModel (gpt_model.py:172) and the
    attention's concentration factor (attention.py:1102, `_yarn_get_concentration_factor_from_config`)
    read ``yarn_*`` attributes of the config, which megatron-core 0.16.1 defines only on
    MLATransformerConfig; set as attributes they work for both the plain and the MLA config."""
    yarn = ling.yarn_params()
    if yarn is None:
        return
    for k, v in yarn.items():
        name = "yarn_rotary_scaling_factor" if k == "scaling_factor" else f"yarn_{k}"
        setattr(tf_config, name, v)
