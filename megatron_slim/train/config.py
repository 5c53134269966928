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
    max_epochs: float = 1.0  # refuse a run that would read a dataset of the blend more often than this
    # The data stream (train/data.py): one shuffle of the blend, `stream_samples` long (0: as long as this run
    # needs), built with `seed` (None: train.seed); this run trains on its samples from `sample_offset` on. A
    # recipe's stages share one stream, each starting where the previous one stopped.
    seed: int | None = None
    sample_offset: int = 0
    stream_samples: int = 0


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

    def teacher_mtp_depths(self, student_depths: int, teacher_depths: int, student: str, teacher: str) -> int:
        """MTP depths to build in the teacher: none unless the student's MTP heads learn from the teacher's own
        (mtp_kd_source: mtp), then as many as the student has (depth k needs only depths 1..k). Refuses a student
        without MTP heads, or a teacher with fewer depths; `student`/`teacher` name the models in the message (the
        trainer's checkpoints, or a recipe stage's models before they exist)."""
        if self.mtp_kd_source != "mtp" or self.mtp_kd_weight == 0:
            return 0
        if student_depths == 0:
            raise UserError(f"loss.mtp_kd_source: mtp, but the student {student} has no MTP heads")
        if teacher_depths < student_depths:
            raise UserError(f"loss.mtp_kd_source: mtp needs a teacher with at least the student's {student_depths} "
                            f"MTP depths; {teacher} has {teacher_depths}")
        return student_depths


@dataclass
class CheckpointSection:
    save_dir: str = ""
    save_interval: int = 0  # steps; 0 = only at the end and on preemption
    keep_last: int = 2
    allow_nonfinite: bool = False  # load the teacher/student or resume from weights holding NaN/Inf (refused)
    keep_every: int = 0  # steps; checkpoints at multiples of it are milestones, never deleted (0 = none)
    async_save: bool = False  # periodic saves written in the background (megatron-core async save); the last is sync


@dataclass
class GuardSection:
    """The non-finite guard (train/guard.py): a step whose loss or gradients are not finite is skipped (weights
    and optimizer state unchanged, on every rank); too many in a row stop the run without saving."""
    max_skipped_steps: int = 10  # consecutive skipped steps that end the run (exit status DIVERGED_EXIT_CODE)
    spike_factor: float = 0.0  # log a loss above spike_factor x the running median (0 = off)
    spike_window: int = 100  # finite losses the running median is taken over
    skip_spikes: bool = False  # also skip the update of a spiking step (counted as a skipped step)


@dataclass
class LoggingSection:
    log_interval: int = 1
    wandb_project: str = ""
    wandb_mode: str = "auto"  # auto (online when the service is reachable, else offline) | online | offline | disabled
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


DISPATCHERS = ("auto", "alltoall", "allgather", "flex")
RECOMPUTE_GRANULARITIES = ("selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")
# megatron-core 0.19's selective recompute modules for these models (mla_up_proj: MLA only; gdn_norm_out: only its
# experimental GDN variant, not the HybridModel GDN layer built here)
RECOMPUTE_MODULES = ("core_attn", "moe_act", "layernorm", "mlp", "moe", "shared_experts")


@dataclass
class RecomputeSection:
    """megatron-core activation recomputation (TransformerConfig recompute_*); `megatron-slim plan` and
    `run --dry-run` show what each setting saves."""
    granularity: str | None = None  # None (off) | selective | full
    method: str | None = None  # full: uniform (chunks of num_layers) | block (the first num_layers per stage)
    num_layers: int | None = None  # full only (default 1)
    modules: list[str] | None = None  # selective: core_attn (default), moe_act, layernorm, mlp, moe, shared_experts


@dataclass
class MemorySection:
    """Knobs that trade compute or communication for memory, passed to megatron-core as they are."""
    recompute: RecomputeSection = field(default_factory=RecomputeSection)
    grad_reduce_dtype: str = "fp32"  # fp32 | bf16: gradient buffers and their reduction (DDP grad_reduce_in_fp32)
    overlap_grad_reduce: bool = False  # DDP: reduce-scatter gradients in buckets during the backward
    overlap_param_gather: bool = False  # DDP: all-gather updated weights during the next forward (needs the above)
    moe_token_dispatcher: str = "auto"  # alltoall | allgather | flex (DeepEP, GPU); auto: alltoall on GPU
    teacher_precision: str = "bf16"  # bf16 | fp8 (teacher's linear weights kept in FP8: Transformer Engine)

    def problems(self, bf16: bool) -> list[str]:
        r, out = self.recompute, []
        if r.granularity is not None and r.granularity not in RECOMPUTE_GRANULARITIES:
            out.append(f"memory.recompute.granularity must be selective or full, not {r.granularity!r}")
        if r.granularity == "full":
            if r.method is not None and r.method not in RECOMPUTE_METHODS:
                out.append(f"memory.recompute.method must be uniform or block, not {r.method!r}")
            if r.num_layers is not None and r.num_layers < 1:
                out.append(f"memory.recompute.num_layers must be >= 1, got {r.num_layers}")
            if r.modules is not None:
                out.append("memory.recompute.modules only applies to granularity: selective")
        else:
            for key in ("method", "num_layers"):
                if getattr(r, key) is not None:
                    out.append(f"memory.recompute.{key} only applies to granularity: full")
            if r.granularity is None and r.modules is not None:
                out.append("memory.recompute.modules needs granularity: selective")
        unknown = sorted(set(r.modules or ()) - set(RECOMPUTE_MODULES))
        if unknown:
            out.append(f"memory.recompute.modules {unknown} are not among {list(RECOMPUTE_MODULES)}")
        if self.grad_reduce_dtype not in ("fp32", "bf16"):
            out.append(f"memory.grad_reduce_dtype must be fp32 or bf16, not {self.grad_reduce_dtype!r}")
        elif self.grad_reduce_dtype == "bf16" and not bf16:
            out.append("memory.grad_reduce_dtype: bf16 needs precision.bf16: true (fp32 weights keep fp32 grads)")
        if self.overlap_param_gather and not self.overlap_grad_reduce:
            out.append("memory.overlap_param_gather needs memory.overlap_grad_reduce: true (megatron-core)")
        if self.moe_token_dispatcher not in DISPATCHERS:
            out.append(f"memory.moe_token_dispatcher must be one of {list(DISPATCHERS)}, not "
                       f"{self.moe_token_dispatcher!r}")
        if self.teacher_precision not in ("bf16", "fp8"):
            out.append(f"memory.teacher_precision must be bf16 or fp8, not {self.teacher_precision!r}")
        elif self.teacher_precision == "fp8" and not bf16:
            out.append("memory.teacher_precision: fp8 needs precision.bf16: true")
        return out

    def recompute_kwargs(self) -> dict:
        """TransformerConfig's recompute fields."""
        r = self.recompute
        if r.granularity == "full":
            return {"recompute_granularity": "full", "recompute_method": r.method or "uniform",
                    "recompute_num_layers": r.num_layers or 1}
        if r.granularity == "selective":
            return {"recompute_granularity": "selective",
                    "recompute_modules": list(r.modules) if r.modules is not None else ["core_attn"]}
        return {}


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
    guard: GuardSection = field(default_factory=GuardSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    memory: MemorySection = field(default_factory=MemorySection)

    @property
    def tokens_per_step(self) -> int:
        return self.batch.global_batch_size * self.data.seq_length

    @property
    def run_samples(self) -> int:
        """Samples this run trains on (from data.sample_offset on)."""
        return self.total_iters * self.batch.global_batch_size

    @property
    def stream_samples(self) -> int:
        """Length of the data stream the datasets are built for (data.stream_samples, at least this run's end)."""
        return max(self.data.stream_samples, self.data.sample_offset + self.run_samples)

    @property
    def data_seed(self) -> int:
        return self.train.seed if self.data.seed is None else self.data.seed

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
        problems += self._evaluation_problems() + self._long_run_problems()
        problems += self.memory.problems(self.precision.bf16)
        if self.parallel.etp is not None and self.parallel.etp < 1:
            problems.append(f"parallel.etp must be >= 1, got {self.parallel.etp}")
        if world_size is not None:
            dp = world_size // self.parallel.model_parallel_size
            per_step = self.batch.micro_batch_size * dp
            if dp < 1 or self.batch.global_batch_size % per_step:
                problems.append(f"global_batch_size {self.batch.global_batch_size} is not a multiple of "
                                f"micro_batch_size * data-parallel size = {per_step}")
        if problems:
            raise UserError("invalid run config: " + "; ".join(problems))

    def _long_run_problems(self) -> list[str]:
        d, g, k = self.data, self.guard, self.checkpoint
        problems = []
        if not d.max_epochs > 0:
            problems.append(f"data.max_epochs must be > 0, got {d.max_epochs}")
        if d.sample_offset < 0 or d.stream_samples < 0:
            problems.append("data.sample_offset and data.stream_samples must be >= 0")
        if g.max_skipped_steps < 1:
            problems.append(f"guard.max_skipped_steps must be >= 1, got {g.max_skipped_steps}")
        if g.spike_factor < 0 or (g.spike_factor and g.spike_factor <= 1):
            problems.append(f"guard.spike_factor must be 0 (off) or > 1, got {g.spike_factor}")
        if g.spike_window < 1:
            problems.append(f"guard.spike_window must be >= 1, got {g.spike_window}")
        if g.skip_spikes and not g.spike_factor:
            problems.append("guard.skip_spikes needs guard.spike_factor > 0")
        if k.keep_every < 0:
            problems.append(f"checkpoint.keep_every must be >= 0, got {k.keep_every}")
        if self.logging.wandb_mode not in ("auto", "online", "offline", "disabled"):
            problems.append(f"logging.wandb_mode must be auto, online, offline or disabled, not "
                            f"{self.logging.wandb_mode!r}")
        return problems

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
