"""Run a megatron-ling checkpoint and an HF directory on the same tokens; compare logits.

Megatron side: the model is built at TP1/PP1/EP1 in this process (a world-size-1 gloo group) and
loaded with megatron-core's own ``dist_checkpointing.load`` - i.e. megatron reshards the training
layout, independently of this package's reader. HF side: NeMo-AutoModel's BailingMoeV2
implementation (an independent re-implementation of the hub's remote code), fp32, with the MTP
layers (HF layers >= L) left out since HF inference does not run them.
"""
from __future__ import annotations

import contextlib

import torch

from megatron_ling.checkpoint import layout, manifest
from megatron_ling.checkpoint.metadata import read_metadata
from megatron_ling.errors import LingConfigError
from megatron_ling.models.config import LingConfig


@contextlib.contextmanager
def single_process_megatron():
    """A world-size-1 gloo process group + megatron parallel state (TP1/PP1/EP1), torn down after."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_ling.training.setup import init_single_process, shutdown_distributed

    own = not dist.is_initialized()
    init_single_process(cpu_threads=None)
    ps.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1234)
    try:
        yield
    finally:
        if own:
            shutdown_distributed()
        else:  # the caller's groups stay; only the parallel state made here goes
            ps.destroy_model_parallel()


def load_megatron_model(ckpt_dir: str, cfg: LingConfig | None = None, verify_checksums: bool = True):
    """Build the fp32 TP1 model and load ``ckpt_dir`` into it (inside ``single_process_megatron``)."""
    from megatron.core import dist_checkpointing

    from megatron_ling.models.builder import build_ling_model
    from megatron_ling.models.megatron_config import to_transformer_config

    path = layout.resolve(ckpt_dir)
    if verify_checksums:
        manifest.check(path)
    read_metadata(path)  # allow-list check before megatron-core unpickles it
    if cfg is None:
        d = layout.read_common_state(path).get("ling_config")
        if not isinstance(d, dict):
            raise LingConfigError(f"verify: {path}/common.pt has no 'ling_config'")
        cfg = LingConfig.from_hf_dict(d)
    torch.manual_seed(0)
    model = build_ling_model(cfg, to_transformer_config(cfg))
    # only the model weights are requested: optimizer / RNG state in the checkpoint is ignored
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, path)
    model.load_state_dict(loaded["model"])
    model.eval()
    return cfg, model


def megatron_forward(model, ids: torch.Tensor):
    """(logits [b, s, V], MTP loss or None) of a megatron GPTModel with labels = ids."""
    from megatron_ling import compat

    b, s = ids.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)[None, None]
    outs = []
    # clone: megatron's vocab-parallel cross entropy works in place on the logits
    h = model.output_layer.register_forward_hook(lambda m, i, o: outs.append(o[0].detach().clone()))
    mtp = model.config.mtp_num_layers
    was_training = model.training
    try:
        compat.clear_mtp_tracker()
        model.train(bool(mtp))  # the MTP loss is recorded in training mode only (no dropout in Ling)
        with torch.no_grad():
            model(ids, pos, attention_mask=mask, labels=ids)
        mtp_loss = compat.mtp_tracked_losses(reduce=False) if mtp else None
    finally:
        h.remove()
        model.train(was_training)
        compat.clear_mtp_tracker()
    return outs[-1].transpose(0, 1).float(), mtp_loss


def reference_model(hf_dir: str):
    """The HF directory loaded into NeMo-AutoModel's BailingMoeV2ForCausalLM, fp32, no MTP."""
    try:
        from nemo_automodel.components.models.common import BackendConfig
        from nemo_automodel.components.models.ling_v2 import BailingMoeV2Config, BailingMoeV2ForCausalLM
    except ImportError:
        raise LingConfigError("verify: needs nemo-automodel (pip install --no-deps nemo-automodel==0.7.0) "
                              "as the independent HF implementation") from None
    from megatron_ling.convert.hf_io import HFReader

    cfg = LingConfig.from_hf_config(hf_dir)
    d = cfg.to_hf_dict()
    d.pop("quantization_config", None)
    d["torch_dtype"] = "float32"
    hc = BailingMoeV2Config(**d)
    m = BailingMoeV2ForCausalLM(hc, backend=BackendConfig(attn="sdpa", linear="torch", rms_norm="torch",
                                                          experts="torch", dispatcher="torch"))
    reader = HFReader(hf_dir)
    L = cfg.num_hidden_layers
    hf_sd = {}
    for n in reader.meta:
        if n.endswith("_scale_inv"):
            continue
        parts = n.split(".")
        if n.startswith("model.layers.") and int(parts[2]) >= L:
            continue  # MTP layers: not part of HF inference
        hf_sd[n] = reader.get_weight(n, torch.float32)
    reader.close()
    native = m.state_dict_adapter.from_hf(hf_sd)
    missing, unexpected = m.load_state_dict(native, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise LingConfigError(f"verify: HF weights do not fit the reference model (missing {missing[:2]}, "
                              f"unexpected {unexpected[:2]})")
    m.eval()
    return m


def reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _megatron_logits(ckpt_dir: str, ids: torch.Tensor, verify_checksums: bool = True):
    with single_process_megatron():
        cfg, model = load_megatron_model(ckpt_dir, verify_checksums=verify_checksums)
        logits, _ = megatron_forward(model, ids)
    return cfg.to_hf_dict(), logits


def verify(ckpt_dir: str, hf_dir: str, seq_len: int = 32, batch: int = 2, seed: int = 0,
           verify_checksums: bool = True) -> dict:
    """max |Δ logits| between the megatron checkpoint and the HF directory on random tokens.
    Single process: it installs the compat patches and a 1-rank process group in this process."""
    cfg_hf = LingConfig.from_hf_config(hf_dir)
    if not 1 <= seq_len <= cfg_hf.max_position_embeddings:
        raise LingConfigError(f"--seq-len: must be in [1, max_position_embeddings={cfg_hf.max_position_embeddings}] "
                              f"of {hf_dir}/config.json, got {seq_len}")
    if batch < 1:
        raise LingConfigError(f"--batch: must be >= 1, got {batch}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg_hf.vocab_size, (batch, seq_len), generator=g)
    cfg_d, mlogits = _megatron_logits(ckpt_dir, ids, verify_checksums)
    if cfg_d["vocab_size"] != cfg_hf.vocab_size or cfg_d["hidden_size"] != cfg_hf.hidden_size:
        raise LingConfigError("verify: the checkpoint and the HF directory are different models "
                              "(vocab_size/hidden_size differ)")
    ref = reference_model(hf_dir)
    hlogits = reference_logits(ref, ids)
    diff = (mlogits - hlogits).abs()
    return {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
            "max_abs_logit": hlogits.abs().max().item(), "tokens": batch * seq_len}
