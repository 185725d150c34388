"""Training recipe: one YAML file (+ dotted overrides) -> one validated dataclass.

Every check here runs before any process group starts, and every failure is one line that names
the field and the fix.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Optional

import yaml

from megatron_ling.config_utils import (apply_overrides, check_fields, check_output_path, coerce_field, from_dict,
                                        load_yaml, spec, to_dict)
from megatron_ling.data.config import DataConfig
from megatron_ling.errors import LingConfigError
from megatron_ling.models.config import LingConfig, get_preset
from megatron_ling.models.options import ModelOptions
from megatron_ling.parallel.config import ParallelConfig
from megatron_ling.parallel.layout import check_layout
from megatron_ling.training.profiler import ProfilingConfig

RECIPES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")


@dataclass
class ModelSection(ModelOptions):
    preset: Optional[str] = "ling-tiny"
    hf_config: Optional[str] = None  # an HF config.json / model dir instead of a preset
    overrides: dict = field(default_factory=dict)  # LingConfig fields (HF names)

    def ling_config(self) -> LingConfig:
        if self.hf_config:
            cfg = LingConfig.from_hf_config(self.hf_config)
        elif not self.preset:
            raise LingConfigError("model.preset: give a preset name (e.g. ling-tiny) or model.hf_config")
        else:
            cfg = get_preset(self.preset)
        return cfg.replace(**self._typed_overrides()) if self.overrides else cfg

    def _typed_overrides(self) -> dict:
        """model.overrides checked against LingConfig's field types, named as the user wrote them."""
        hints = typing.get_type_hints(LingConfig)
        out = {}
        for k, v in self.overrides.items():
            if k not in hints or k == "extra":
                raise LingConfigError(f"model.overrides.{k}: unknown Ling config field; valid fields are those "
                                      f"of HF BailingMoeV2 config.json ({', '.join(n for n in hints if n != 'extra')})")
            out[k] = coerce_field(v, hints[k], f"model.overrides.{k}")
        return out

    def options(self) -> ModelOptions:
        names = {f.name for f in dataclasses.fields(ModelOptions)}
        return ModelOptions(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


@dataclass
class TrainingConfig:
    train_iters: int = spec(100, ">= 1")
    micro_batch_size: int = spec(1, ">= 1")
    global_batch_size: int = spec(8, ">= 1")
    seq_length: int = spec(128, ">= 1")
    eval_interval: Optional[int] = spec(None, ">= 1")
    eval_iters: int = spec(2, ">= 1")
    calculate_per_token_loss: bool = False


@dataclass
class OptimizerSection:
    lr: float = spec(3e-4, "> 0")
    min_lr: float = spec(0.0, ">= 0")
    weight_decay: float = spec(0.1, ">= 0")
    adam_beta1: float = spec(0.9, "[0, 1)")
    adam_beta2: float = spec(0.95, "[0, 1)")
    adam_eps: float = spec(1e-8, "> 0")
    clip_grad: float = spec(1.0, ">= 0")  # 0: no clipping


@dataclass
class LRConfig:
    # wsm: warmup then constant (decay is emulated by merging checkpoints, WSM); constant: same
    # without warmup semantics; cosine / linear: decay to min_lr over decay_iters; wsd: warmup,
    # stable, then decay over wsd_decay_iters at the end.
    schedule: str = spec("wsm", choices=("wsm", "constant", "cosine", "linear", "wsd"))
    warmup_iters: int = spec(0, ">= 0")
    decay_iters: Optional[int] = spec(None, ">= 1")  # default: training.train_iters
    wsd_decay_iters: Optional[int] = spec(None, ">= 1")
    wsd_decay_style: str = spec("exponential", choices=("exponential", "linear", "cosine", "minus_sqrt"))


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # default: {run_dir}/checkpoints
    interval: Optional[int] = spec(None, ">= 1")  # save every N iterations (and always at the end)
    resume: str = "auto"  # auto (latest complete checkpoint in dir, if any) | none | PATH
    load_optimizer: bool = True  # false: load model weights only (e.g. across EP sizes)
    finetune: bool = False  # load weights only and start at iteration 0 (e.g. after from-hf)
    save: bool = True
    keep_last: Optional[int] = spec(None, ">= 1")  # keep the newest N iterations of this run; null: keep all
    verify_checksums: bool = True  # check the resumed checkpoint against its checksums.json first


@dataclass
class LoggingConfig:
    log_interval: int = spec(1, ">= 1")
    tensorboard_dir: Optional[str] = None  # default: {run_dir}/tensorboard
    metrics_file: Optional[str] = None  # default: {run_dir}/metrics.jsonl
    per_layer_moe_stats: bool = True
    peak_tflops: Optional[float] = spec(None, "> 0")  # dense peak per GPU for MFU; default: the device table (throughput.py)


@dataclass
class Recipe:
    run_dir: str = "runs/default"
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    lr: LRConfig = field(default_factory=LRConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)

    # ----------------------------------------------------------------- paths
    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")

    @property
    def tensorboard_dir(self) -> str:
        return self.logging.tensorboard_dir or os.path.join(self.run_dir, "tensorboard")

    @property
    def metrics_file(self) -> str:
        return self.logging.metrics_file or os.path.join(self.run_dir, "metrics.jsonl")

    # ----------------------------------------------------------------- derived
    def num_microbatches(self, world_size: int) -> int:
        dp = self.parallel.data_parallel_size(world_size)
        return self.training.global_batch_size // (self.training.micro_batch_size * dp)

    def to_dict(self) -> dict:
        return to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # -------------------------------------------------------------- validation
    def validate(self, world_size: Optional[int] = None) -> "Recipe":
        """All checks that need no process group. ``world_size``: number of processes."""
        check_output_path(coerce_field(self.run_dir, str, "run_dir"), "run_dir")
        for f in dataclasses.fields(self):  # types and ranges of every section's fields
            if dataclasses.is_dataclass(getattr(self, f.name)):
                check_fields(getattr(self, f.name), f.name)
        self._validate_paths()
        ling = self.model.ling_config().validate()
        self.model.options().validate()
        par = self.parallel.validate(world_size)
        t = self.training
        if ling.num_attention_heads % par.tp:
            raise LingConfigError(f"parallel.tp: tp={par.tp} does not divide num_attention_heads="
                                  f"{ling.num_attention_heads}; pick a tp that divides it")
        if ling.num_key_value_heads % par.tp:
            raise LingConfigError(f"parallel.tp: tp={par.tp} does not divide num_key_value_heads="
                                  f"{ling.num_key_value_heads}; pick a tp that divides it")
        if ling.num_moe_layers and ling.num_experts % par.ep:
            raise LingConfigError(f"parallel.ep: num_experts={ling.num_experts} is not divisible by ep={par.ep}; "
                                  f"pick an ep that divides it")
        if t.seq_length > ling.max_position_embeddings:
            raise LingConfigError(f"training.seq_length: {t.seq_length} exceeds model max_position_embeddings="
                                  f"{ling.max_position_embeddings}")
        if par.sequence_parallel and t.seq_length % (par.tp * par.cp):
            raise LingConfigError(f"training.seq_length: {t.seq_length} must be divisible by tp*cp="
                                  f"{par.tp * par.cp} with sequence parallelism")
        if par.cp > 1 and t.seq_length % (2 * par.cp):
            raise LingConfigError(f"training.seq_length: must be divisible by 2*cp={2 * par.cp}")
        if world_size is not None:
            dp = par.data_parallel_size(world_size)
            if t.global_batch_size % (t.micro_batch_size * dp):
                raise LingConfigError(
                    f"training.global_batch_size: {t.global_batch_size} is not divisible by micro_batch_size x "
                    f"data-parallel size = {t.micro_batch_size} x {dp}; make it a multiple of {t.micro_batch_size * dp}")
            nmb = self.num_microbatches(world_size)
            if (par.vpp or 1) > 1 and nmb % par.pp:
                raise LingConfigError(f"training.global_batch_size: interleaved pipelining needs the number of "
                                      f"microbatches ({nmb}) to be a multiple of pp={par.pp}")
        self._validate_pipeline(ling)
        self._validate_lr()
        if self.checkpoint.resume not in ("auto", "none") and not os.path.isdir(self.checkpoint.resume):
            raise LingConfigError(f"checkpoint.resume: {self.checkpoint.resume} is not a directory; "
                                  f"use auto, none, or a checkpoint directory")
        self.data.validate()
        self.profiling.validate()
        return self

    def _validate_paths(self) -> None:
        """Output locations the run will create, refused now rather than at the first write."""
        for name, path in (("checkpoint.dir", self.checkpoint.dir), ("logging.tensorboard_dir", self.logging.tensorboard_dir),
                           ("profiling.dir", self.profiling.dir), ("data.cache_dir", self.data.cache_dir)):
            if path is not None:
                check_output_path(path, name)
        if self.logging.metrics_file is not None:
            if os.path.isdir(self.logging.metrics_file):
                raise LingConfigError(f"logging.metrics_file: {self.logging.metrics_file} is a directory; give a file path")
            check_output_path(os.path.dirname(os.path.abspath(self.logging.metrics_file)), "logging.metrics_file")

    def _validate_pipeline(self, ling: LingConfig) -> None:
        par = self.parallel
        mtp = ling.num_nextn_predict_layers
        if par.pipeline_layout and par.pipeline_layout != "auto":
            check_layout(par.pipeline_layout, par.pp, ling.num_hidden_layers, mtp, par.vpp)
            return
        if par.pp == 1 or par.pipeline_layout == "auto":
            return
        n = ling.num_hidden_layers
        stages = par.pp * (par.vpp or 1)
        first, last = par.num_layers_in_first_pipeline_stage, par.num_layers_in_last_pipeline_stage
        if first is not None or last is not None:
            rest = n - (first or 0) - (last or 0)
            middle = par.pp - (first is not None) - (last is not None)
            if rest < 0 or (middle and rest % (middle * (par.vpp or 1))) or (not middle and rest):
                raise LingConfigError(
                    f"parallel.num_layers_in_first_pipeline_stage: first={first}, last={last} leave {rest} of "
                    f"{n} layers for {middle} middle stages; they must split evenly (or use pipeline_layout)")
            return
        extra = int(par.account_for_embedding_in_pipeline_split) + int(par.account_for_loss_in_pipeline_split)
        if (n + extra) % stages:
            raise LingConfigError(
                f"parallel.pp: {n} layers{' (+embedding/loss)' if extra else ''} do not split evenly over "
                f"pp*vpp={stages} stages; give parallel.pipeline_layout (e.g. 'Et|tt|tmL') or "
                f"num_layers_in_first/last_pipeline_stage")

    def _validate_lr(self) -> None:
        lr = self.lr
        if lr.warmup_iters < 0 or lr.warmup_iters > self.training.train_iters:
            raise LingConfigError(f"lr.warmup_iters: must be in [0, training.train_iters={self.training.train_iters}]")
        if lr.schedule == "wsd" and not lr.wsd_decay_iters:
            raise LingConfigError("lr.wsd_decay_iters: the wsd schedule needs the length of its final decay")
        if self.optimizer.lr <= 0 or self.optimizer.min_lr < 0 or self.optimizer.min_lr > self.optimizer.lr:
            raise LingConfigError("optimizer.lr: need lr > 0 and 0 <= min_lr <= lr")


def builtin_recipe_path(name: str) -> str:
    return os.path.join(RECIPES_DIR, name if name.endswith(".yaml") else f"{name}.yaml")


def load_recipe(path: str, overrides: Optional[list[str]] = None) -> Recipe:
    """Load a recipe YAML (a path, or the name of a built-in recipe such as 'quickstart')."""
    if not os.path.exists(path) and os.path.exists(builtin_recipe_path(path)):
        path = builtin_recipe_path(path)
    d = apply_overrides(load_yaml(path), overrides or [])
    return from_dict(Recipe, d, "recipe")


def recipe_from_dict(d: dict) -> Recipe:
    return from_dict(Recipe, d, "recipe")
