"""The recipe's schema: one YAML file takes a teacher to a compressed, distilled, evaluated student, in stages.

    name: slimqwen                      # free text, used in the report
    teacher: /ckpt/Qwen3-Next-80B-A3B   # HF dir (config.json) or Megatron checkpoint (model_config.json)
    data:
      train: /data/pretrain.jsonl       # .jsonl (tokenized once by the run) or [[weight, indexed prefix], ...]
      calibration: /data/calib.jsonl    # importance statistics (.jsonl or an indexed prefix)
      heldout: /data/heldout.jsonl      # evaluation (.jsonl or an indexed prefix); must not overlap training
      seq_length: 4096
    parallel: {tp: 1, pp: 1, ep: 8}     # layout of importance, distillation and evaluation (etp: expert TP)
    nproc: 8                            # local ranks when not launched by torchrun/srun
    cluster: {nodes: 16, gpus_per_node: 8, gpu_memory: 80GiB}   # optional: what the stages run on; the dry run
                                        # and the run refuse a stage whose memory plan does not fit
    importance: {tokens: 5e7}           # see ImportanceSection
    evaluation: {tokens: 1e7}           # see EvaluationSection
    training: {...}                     # run-config sections (batch, optimizer, schedule, loss, precision, ...)
                                        # shared by every stage; model/teacher/data/save_dir are the run's
    target: {num_layers: 36, ...}       # the final student (compress/target.py fields)
    preset: depth_first                 # one_shot | depth_first: stages derived from `target`
    train_tokens: 400e9                 # preset: distillation tokens over all stages
    stage_token_split: [0.5, 0.5]       # depth_first: share of train_tokens per stage
    stages:                             # or explicit stages instead of a preset
      - name: depth
        target: {num_layers: 36}        # sizes are absolute; unset sizes keep the previous stage's
        training: {train: {train_tokens: 2e11}, optimizer: {lr: 2e-4}}   # merged over `training`
        align_neurons: false            # prune options (see `megatron-slim prune --help`)
    init: pruned                        # pruned | random: the first stage's student pruned from the teacher,
                                        # or the planned architecture initialised as megatron-core initialises one
    add_mtp_layers: 0                   # MTP depths the first stage's student gains beyond the teacher's, fresh
                                        # (initialised as megatron-core does), trained by the MTP loss terms
    export: true                        # false: skip the final HF export (e.g. ablations)
    inference: {batch: 1, prompt_len: 512, gen_len: 64}   # optional: after the export, the deployment-efficiency
                                        # table (bench-inference on the HF teacher and the exported student);
                                        # engines: [transformers, vllm] adds vLLM (`make vllm-env`; vllm_python:
                                        # PATH names another interpreter)
    timeout_minutes: 30                 # process-group timeout: a hung collective or dead rank fails the job
    variants:                           # optional: settings to compare, each the recipe deep-merged with its
      pruned: {}                        # overrides (any key above); steps whose inputs agree run once
      random_init: {init: random}
      kd_only: {training: {loss: {kd_weight: 1.0}}}
    reference: pruned                   # the variant the comparison report measures the others against

This module declares what a recipe holds (typed sections, a `Recipe`, a `Study` of variants); run/recipe_parse.py
reads the YAML into them, run/recipe_check.py checks them against the models, data and run configs. Everything is
checked by `load_recipe` (recipe_check.py) before any compute: unknown keys, missing files, each stage's target
against the model it starts from (the configs are chained without touching weights), the final student against
`target`, and each stage's run config; with variants, every variant, each problem naming its variant.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_slim.compress.target import TargetSpec
from megatron_slim.engines.bench_inference_job import BenchInferenceJob
from megatron_slim.engines.evaluate_job import EvaluateJob
from megatron_slim.engines.importance_job import ImportanceJob
from megatron_slim.errors import UserError
from megatron_slim.runtime.layout import ParallelLayout
from megatron_slim.runtime.seed import DEFAULT_SEED

PRESETS = ("one_shot", "depth_first")
INITS = ("pruned", "random")
# run-config sections that the run owns: a recipe setting them would be silently overridden
RUN_OWNED = {"model", "teacher", "parallel", "evaluation"}
RUN_OWNED_DATA = {"blend", "seq_length", "cache_dir", "seed", "sample_offset", "stream_samples"}
# The parallel sizes a recipe's steps pass to their jobs (the `parallel:` section's keys). etp (expert tensor
# parallelism) is accepted too but only shapes distillation (stage_run_config): the steps that hold no optimizer
# run their experts at etp = tp.
RECIPE_SIZES = ("tp", "pp", "ep")
TOP_KEYS = {"name", "teacher", "data", "parallel", "nproc", "importance", "evaluation", "training", "target",
            "preset", "train_tokens", "stage_token_split", "stages", "init", "add_mtp_layers", "export",
            "inference", "cluster", "timeout_minutes"}
# names the run gives its own step groups and work-dir entries
RESERVED = ("prepare", "final", "shared", "variants")
STAGE_KEYS = {"name", "target", "training", "align_neurons", "rescale_norms"}


class RecipeError(UserError):
    """The recipe is malformed or cannot be executed; raised before any compute."""


@dataclass(frozen=True)
class DataSources:
    """The recipe's raw data, one source per use (the run tokenizes .jsonl files once); each stage's distillation
    then reads the training source as the run config's `data.blend` (train/config.py DataSection)."""
    train: str | list[list[Any]] = ""
    calibration: str = ""
    heldout: str = ""
    seq_length: int = 1024


@dataclass(frozen=True)
class ClusterSection:
    """Where distillation runs: its world size and GPU memory size the memory plan (train/memory_plan.py)."""
    nodes: int = 1
    gpus_per_node: int = 0  # 0: the recipe's nproc
    gpu_memory: str = ""  # e.g. 80GiB; empty: the plan is printed without a verdict


def _job_key(section: str, field: str) -> str:
    """The recipe key a job field comes from (the window length and the layout are the recipe's own)."""
    if field == "seq_len":
        return "data.seq_length"
    if field in RECIPE_SIZES:
        return f"parallel.{field}"
    return f"{section}.{field}"


@dataclass(frozen=True)
class ImportanceSection:
    """The settings of each stage's `importance` job (engines/importance_job.py), which `job` builds."""

    tokens: float = 1e6  # the recipe's own default (the command's --tokens is required)
    micro_batch: int = ImportanceJob.micro_batch
    layer_loss: bool = ImportanceJob.layer_loss  # loss_increase depth criterion: one extra forward per layer
    dtype: str = ImportanceJob.dtype  # float32 | bfloat16 (statistics accumulate in float64 either way)

    def job(self, model: str, data: str, out: Path, seq_len: int, parallel: ParallelLayout,
            progress: bool = True) -> ImportanceJob:
        return ImportanceJob(model=model, data=data, tokens=int(self.tokens), out=out, parallel=parallel,
                             seq_len=seq_len, micro_batch=self.micro_batch, layer_loss=self.layer_loss,
                             max_tokens=None, dtype=self.dtype, overwrite=True, progress=progress)

    @staticmethod
    def key(field: str) -> str:
        return _job_key("importance", field)


@dataclass(frozen=True)
class EvaluationSection:
    """The settings of every held-out evaluation of a run (engines/evaluate_job.py's job, which `job` builds), and
    of the evaluation along distillation (`every_tokens`)."""

    # defaults are the `evaluate` job's (EvaluateJob), except tokens and prompt_len, which follow the recipe
    tokens: float = 1e5  # held-out tokens for loss / perplexity / next-token accuracy
    micro_batch: int = EvaluateJob.micro_batch
    mtp_k: int = EvaluateJob.mtp_k  # speculative acceptance for drafts of 1..mtp_k tokens (MTP heads; 0: skip)
    mtp_prompts: int = EvaluateJob.mtp_prompts  # held-out prompts the acceptance is measured on
    prompt_len: int = 0  # prompt tokens (0: half the recipe's data.seq_length)
    gen_tokens: int = EvaluateJob.gen_tokens  # greedy tokens generated after each prompt
    every_tokens: float = 0.0  # also evaluate the student during distillation every N tokens (0: only after)
    tasks: list[str] = field(default_factory=list)  # lm-eval tasks every evaluation also scores (offline data)
    num_fewshot: int | None = EvaluateJob.num_fewshot  # lm-eval few-shot examples (None: each task's default)
    limit: float | None = EvaluateJob.limit  # lm-eval documents per task (a fraction when < 1; None: all)

    def job(self, model: str, data: str, out: Path | None, seq_len: int, parallel: ParallelLayout) -> EvaluateJob:
        return EvaluateJob(model=model, data=data, tokens=int(self.tokens), seq_len=seq_len,
                           micro_batch=self.micro_batch, parallel=parallel, mtp_k=self.mtp_k,
                           mtp_prompts=self.mtp_prompts, prompt_len=self.prompt_len or seq_len // 2,
                           gen_tokens=self.gen_tokens, tasks=tuple(self.tasks), num_fewshot=self.num_fewshot,
                           limit=self.limit, out=out)

    @staticmethod
    def key(field: str) -> str:
        return _job_key("evaluation", field)


@dataclass(frozen=True)
class InferenceSection:
    """`bench-inference` settings for the run's deployment-efficiency table (engines/bench_inference_job.py)."""

    batch: int = BenchInferenceJob.batch
    prompt_len: int = BenchInferenceJob.prompt_len
    gen_len: int = BenchInferenceJob.gen_len
    dtype: str = BenchInferenceJob.dtype
    device: str = BenchInferenceJob.device
    warmup: int = BenchInferenceJob.warmup
    repeats: int = BenchInferenceJob.repeats
    engines: list[str] = field(default_factory=lambda: list(BenchInferenceJob.engines))  # transformers and/or vllm
    vllm_python: str | None = BenchInferenceJob.vllm_python  # the vLLM environment's interpreter (None: .vllm-venv/)

    def job(self, models: tuple[str, ...]) -> BenchInferenceJob:
        settings = dataclasses.asdict(self)
        engines = tuple(self.engines) if isinstance(self.engines, list) else self.engines
        return BenchInferenceJob(models=models, **settings | {"engines": engines})

    @staticmethod
    def key(field: str) -> str:
        return f"inference.{field}"


@dataclass(frozen=True)
class StageTraining:
    """A stage's run-config overrides: the recipe's `training` sections deep-merged with the stage's own (a preset
    adds the stage's token budget), checked at parse time to leave the run's own sections alone. They become the
    stage's `train --config` (recipe_check.stage_run_config), which validates every section; `seed` is the seed
    the stage trains with (`train.seed`), which an `init: random` student is also initialised from."""

    sections: dict[str, Any] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return int((self.sections.get("train") or {}).get("seed", DEFAULT_SEED))

    @property
    def train_tokens(self) -> float | None:
        """The stage's distillation tokens when set (`train.train_tokens`; else `train.train_iters` rules)."""
        tokens = (self.sections.get("train") or {}).get("train_tokens")
        return None if tokens is None else float(tokens)


@dataclass(frozen=True)
class Stage:
    name: str
    target: TargetSpec
    training: StageTraining
    align_neurons: bool = False
    rescale_norms: bool = True


@dataclass(frozen=True)
class Recipe:
    name: str
    teacher: Path
    data: DataSources
    parallel: ParallelLayout
    nproc: int
    importance: ImportanceSection
    evaluation: EvaluationSection
    stages: list[Stage]
    source: dict[str, Any] = field(repr=False)  # the parsed YAML, for the work dir's record
    final_target: TargetSpec | None = None  # the recipe's `target`: the student the last stage must produce
    init: str = "pruned"  # pruned | random (the first stage's student)
    add_mtp_layers: int = 0  # fresh MTP depths the first stage's student gains
    export: bool = True  # the final HF export
    inference: InferenceSection | None = None  # the efficiency table after the export (None: not measured)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    variant: str | None = None  # the variant's name when the recipe declares variants
    timeout_minutes: float = 30.0  # process-group timeout of `run`: a hung collective fails the job after this

    @property
    def digest(self) -> str:
        """Identifies the recipe's content (a work dir belongs to one recipe). The final target is hashed under the
        key earlier versions kept it in the parsed YAML, so existing work dirs keep their digest and resume."""
        final = dataclasses.asdict(self.final_target) if self.final_target is not None else None
        record = self.source | {"_final_target": final}
        return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise RecipeError(f"no stage {name!r} in the recipe (stages: {[s.name for s in self.stages]})")


@dataclass(frozen=True)
class Study:
    """What a recipe file asks for: one run (`variants` empty, the recipe under the key None), or variants of it,
    each a complete recipe, compared against `reference`."""

    recipes: dict[str | None, Recipe]
    reference: str | None = None

    @property
    def variants(self) -> list[str]:
        return [name for name in self.recipes if name is not None]

    def recipe(self, variant: str | None) -> Recipe:
        if variant not in self.recipes:
            if variant is None:
                raise RecipeError(f"the recipe declares variants {self.variants}: name one with --variant, or run "
                                  "them all")
            raise RecipeError(f"no variant {variant!r} in the recipe (variants: {self.variants or 'none'})")
        return self.recipes[variant]
