"""The run config (`megatron-slim train --config RUN.yaml`): explicit dataclasses read by the recipes' loader
(`runtime/config_loader.py`: unknown keys and wrong types are errors, all reported at once)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_slim.distill.objective import Objective
from megatron_slim.errors import UserError
from megatron_slim.runtime.config_loader import load_dataclass, load_yaml
from megatron_slim.runtime.layout import ParallelLayout
from megatron_slim.runtime.seed import DEFAULT_SEED


@dataclass
class ModelSection:
    checkpoint: str = ""  # Megatron checkpoint dir (model_config.json) or HF dir (converted once into the save dir)


@dataclass
class DataSection:
    blend: list[list[Any]] = field(default_factory=list)  # [[weight, indexed-dataset prefix], ...]
    split: str = "99,1,0"  # train,valid,test shares (megatron-core's split string)
    seq_length: int = 1024
    eod_mask_loss: bool = False  # do not train on predicting the end-of-document token
    cache_dir: str = ""  # megatron-core dataset index cache (default: <save_dir>/data_cache)


@dataclass
class BatchSection:
    micro_batch_size: int = 1
    global_batch_size: int = 8


@dataclass
class TrainSection:
    train_tokens: float = 0.0  # e.g. 400e9; wins over train_iters when set
    train_iters: int = 0
    seed: int = DEFAULT_SEED
    exit_interval: int = 0  # checkpoint and exit (status 0) every N steps: bounded sessions on shared clusters


@dataclass
class OptimizerSection:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class ScheduleSection:
    style: str = "cosine"  # cosine | wsd | linear | constant
    warmup_tokens: float = 0.0
    warmup_iters: int = 0
    wsd_decay_fraction: float = 0.1  # WSD: share of training spent decaying at the end
    wsd_decay_style: str = "linear"  # exponential | linear | cosine | minus_sqrt


@dataclass
class PrecisionSection:
    bf16: bool = False
    fp8: str | None = None  # e4m3 | hybrid (Transformer Engine on GPU only)
    fp8_recipe: str = "delayed"  # delayed | tensorwise | mxfp8 | blockwise


@dataclass
class LossSection(Objective):
    """The objective's terms, plus the MoE auxiliary losses megatron-core adds inside the model."""
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: float | None = None


@dataclass
class CheckpointSection:
    save_dir: str = ""
    save_interval: int = 0  # steps; 0 = only at the end and on preemption
    keep_last: int = 2


@dataclass
class LoggingSection:
    log_interval: int = 1
    wandb_project: str = ""
    wandb_mode: str = "offline"  # offline | online | disabled
    peak_tflops: float = 0.0  # per device, for the MFU estimate (e.g. 989 for H100 bf16); 0 = not reported


@dataclass
class EvaluationSection:
    """Held-out evaluation along training: the student's loss on the same windows every `every_tokens` training
    tokens (and at step 0 and the end), appended to <save_dir>/eval.jsonl, so runs compare as loss-vs-tokens."""
    data: str = ""  # held-out .jsonl or Megatron indexed-dataset prefix, read as calibration data are
    tokens: float = 0.0  # held-out tokens per evaluation, in windows of data.seq_length
    every_tokens: float = 0.0  # 0 = off
    micro_batch: int = 1

    @property
    def enabled(self) -> bool:
        return self.every_tokens > 0


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    teacher: ModelSection | None = None
    data: DataSection = field(default_factory=DataSection)
    parallel: ParallelLayout = field(default_factory=ParallelLayout)
    batch: BatchSection = field(default_factory=BatchSection)
    train: TrainSection = field(default_factory=TrainSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    loss: LossSection = field(default_factory=LossSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)

    @property
    def tokens_per_step(self) -> int:
        return self.batch.global_batch_size * self.data.seq_length

    @property
    def total_iters(self) -> int:
        if self.train.train_tokens:
            return math.ceil(self.train.train_tokens / self.tokens_per_step)
        return self.train.train_iters

    @property
    def warmup_iters(self) -> int:
        if self.schedule.warmup_tokens:
            return math.ceil(self.schedule.warmup_tokens / self.tokens_per_step)
        return self.schedule.warmup_iters

    def validate(self, world_size: int | None = None) -> None:
        problems = []
        if not self.model.checkpoint:
            problems.append("model.checkpoint is required")
        if not self.data.blend:
            problems.append("data.blend needs at least one [weight, prefix]")
        if not self.checkpoint.save_dir:
            problems.append("checkpoint.save_dir is required")
        if self.total_iters <= 0:
            problems.append("set train.train_tokens or train.train_iters")
        if not 0.0 <= self.loss.kd_weight <= 1.0:
            problems.append("loss.kd_weight (alpha) must be in [0, 1]")
        if self.loss.kd_kind not in ("fkl", "rkl", "jsd"):
            problems.append(f"loss.kd_kind must be fkl, rkl or jsd, not {self.loss.kd_kind!r}")
        if self.loss.mtp_kd_source not in ("main", "mtp"):
            problems.append(f"loss.mtp_kd_source must be main or mtp, not {self.loss.mtp_kd_source!r}")
        if self.teacher is None and self.loss.mtp_kd_source == "mtp":
            problems.append("loss.mtp_kd_source: mtp needs a teacher")
        if self.schedule.style not in ("cosine", "wsd", "linear", "constant"):
            problems.append(f"schedule.style {self.schedule.style!r} is not cosine, wsd, linear or constant")
        if self.teacher is None and self.loss.kd_weight > 0:
            problems.append("loss.kd_weight > 0 needs a teacher (or set it to 0 for plain training)")
        if self.precision.fp8 and self.precision.fp8 not in ("e4m3", "hybrid"):
            problems.append(f"precision.fp8 must be e4m3 or hybrid, not {self.precision.fp8!r}")
        problems += self._evaluation_problems()
        if world_size is not None:
            dp = world_size // self.parallel.model_parallel_size
            per_step = self.batch.micro_batch_size * dp
            if dp < 1 or self.batch.global_batch_size % per_step:
                problems.append(f"global_batch_size {self.batch.global_batch_size} is not a multiple of "
                                f"micro_batch_size * data-parallel size = {per_step}")
        if problems:
            raise UserError("invalid run config: " + "; ".join(problems))

    def _evaluation_problems(self) -> list[str]:
        e = self.evaluation
        problems = []
        if e.every_tokens < 0 or e.tokens < 0:
            problems.append("evaluation.every_tokens and evaluation.tokens must be >= 0 (every_tokens 0 = off)")
        if e.micro_batch < 1:
            problems.append("evaluation.micro_batch must be >= 1")
        if e.enabled and not e.data:
            problems.append("evaluation.every_tokens > 0 needs evaluation.data (a held-out .jsonl or indexed-dataset "
                            "prefix)")
        if e.enabled and e.tokens <= 0:
            problems.append("evaluation.every_tokens > 0 needs evaluation.tokens > 0 (held-out tokens per evaluation)")
        if e.enabled and self.parallel.cp > 1:
            problems.append("evaluation along training does not run with parallel.cp > 1 (it forwards whole windows)")
        return problems


def _build(data: Any, where: str) -> RunConfig:
    """Every problem of the config in one error."""
    problems: list[str] = []
    cfg = load_dataclass(RunConfig, data, where, problems)
    if problems:
        raise UserError("; ".join(problems))
    return cfg


def load_run_config(path: str | Path) -> RunConfig:
    data = load_yaml(path) or {}
    return _build(data, str(path))


def run_config_from_dict(data: dict) -> RunConfig:
    return _build(data, "config")


def run_config_to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)
