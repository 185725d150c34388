"""Build Ling 2.0 models out of Megatron-Core parts (GPTModel + Ling specs)."""
from __future__ import annotations

from megatron_ling.models.config import LingConfig
from megatron_ling.models.megatron_config import te_available


def layer_specs(tf_config, vp_stage=None, use_te: bool | None = None):
    """Decoder block spec and MTP block spec for this (virtual) pipeline stage.

    Transformer Engine specs (fused norm+linear, TEGroupedMLP experts with grouped GEMM) when TE and
    CUDA are present; Megatron's local specs (torch RMSNorm, SequentialMLP experts) otherwise.
    The MTP layer is a MoE layer (Ling's MTP MLP is always MoE), i.e. the spec of the last layer.
    """
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_decoder_layer_specs,
        get_gpt_mtp_block_spec,
    )

    use_te = te_available() if use_te is None else use_te
    block = get_gpt_decoder_block_spec(tf_config, use_transformer_engine=use_te, normalization="RMSNorm",
                                       vp_stage=vp_stage)
    mtp = None
    if tf_config.mtp_num_layers:
        all_layers = get_gpt_decoder_layer_specs(tf_config, use_transformer_engine=use_te, normalization="RMSNorm")
        mtp = get_gpt_mtp_block_spec(tf_config, all_layers[-1], use_transformer_engine=use_te, vp_stage=vp_stage)
    return block, mtp


def build_ling_model(config: LingConfig, tf_config, pre_process: bool | None = None,
                     post_process: bool | None = None, vp_stage: int | None = None,
                     max_sequence_length: int | None = None):
    """Return the Megatron-Core GPTModel chunk of a Ling model for this rank and virtual stage.

    ``tf_config`` comes from ``to_transformer_config(config, parallel, options)``. ``pre_process`` /
    ``post_process`` default to whether this (virtual) stage is the first / last pipeline stage.
    Requires megatron's parallel state to be initialised (as any Megatron-Core model does).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_model import GPTModel

    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    block, mtp = layer_specs(tf_config, vp_stage=vp_stage)
    from megatron_ling import compat

    compat.quiet_gptmodel_deprecation()
    yarn = config.yarn_params()
    model = GPTModel(
        config=tf_config,
        transformer_layer_spec=block,
        vocab_size=config.vocab_size,
        max_sequence_length=max_sequence_length or config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=config.tie_word_embeddings,
        position_embedding_type="yarn" if yarn else "rope",
        rotary_percent=config.partial_rotary_factor,
        rotary_base=config.rope_theta,
        mtp_block_spec=mtp,
        vp_stage=vp_stage,
    )
    if yarn:
        model.rotary_pos_emb = partial_yarn_embedding(config, tf_config)
    return model


def partial_yarn_embedding(config: LingConfig, tf_config):
    """megatron-core's YarnRotaryEmbedding over Ling's rotary channels only.

    megatron-core (0.16.1, yarn_rotary_pos_embedding.py:66 ``self.dim = kv_channels``) computes
    YaRN's frequencies and correction range over the whole head and ignores ``rotary_percent``, so
    the GPTModel-built one would rotate all 128 channels of a Ling head. Built with
    ``kv_channels=rotary_dim`` and ``rotary_percent=1`` it yields ``rotary_dim`` frequencies, and
    apply_rotary_pos_emb rotates the first ``rotary_dim`` channels and passes the rest through,
    as HF BailingMoeV2 does."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding

    return YarnRotaryEmbedding(kv_channels=config.rotary_dim, rotary_percent=1.0,
                               rotary_base=config.rope_theta,
                               use_cpu_initialization=tf_config.use_cpu_initialization,
                               **config.yarn_params())
