"""The step contract of a run, shared by the steps, the runner, the report, the comparison, export, the ablation
suite and the demo, which read finished steps by id: the step groups around a run's stages (a step id is
`<group>/<name>`), the ids of the steps outside the stages, which step a stage reads its model from, and the
work-dir layout:

    <workdir>/state.json                 finished steps and their outputs (run/state.py), keyed by step id
    <workdir>/shared/state.json          with variants: the steps several variants share, keyed by record id
    <workdir>/shared/<key>/              a shared step's outputs
    <workdir>/variants/<name>/           each variant's own work dir (its own state.json)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from megatron_slim.run.recipe_schema import Recipe, Stage

PREPARE = "prepare"
FINAL = "final"
SHARED = "shared"  # <workdir>/shared/: steps that variants share, with their own state.json
VARIANTS = "variants"  # <workdir>/variants/<name>/: each variant's own work dir

TEACHER = f"{PREPARE}/teacher"  # outputs: mcore, tokenizer
DATA = f"{PREPARE}/data"  # outputs: train, calibration, heldout
EVAL_TEACHER = f"{PREPARE}/eval_teacher"  # outputs: eval
EXPORT = f"{FINAL}/export"  # outputs: hf
BENCH_INFERENCE = f"{FINAL}/bench_inference"
REPORT = f"{FINAL}/report"  # outputs: report


@dataclass(frozen=True)
class StageSteps:
    """The ids of one stage's steps, in run order (the student comes from `prune`, or from `init` for the first
    stage of an `init: random` recipe)."""

    stage: str

    @property
    def importance(self) -> str:  # outputs: importance
        return f"{self.stage}/importance"

    @property
    def plan(self) -> str:  # outputs: plan, plots
        return f"{self.stage}/plan"

    @property
    def prune(self) -> str:  # outputs: checkpoint
        return f"{self.stage}/prune"

    @property
    def init(self) -> str:  # outputs: checkpoint
        return f"{self.stage}/init"

    @property
    def eval_pruned(self) -> str:  # outputs: eval
        return f"{self.stage}/eval_pruned"

    @property
    def distill(self) -> str:  # outputs: checkpoint, steps, metrics
        return f"{self.stage}/distill"

    @property
    def eval(self) -> str:  # outputs: eval
        return f"{self.stage}/eval"


def stage_steps(stage: Stage | str) -> StageSteps:
    return StageSteps(stage if isinstance(stage, str) else stage.name)


class Out:
    """The output keys of the steps: what `RunView.outputs(step)[key]` holds (paths unless said otherwise)."""

    MCORE: Final = "mcore"  # prepare/teacher: the teacher as a Megatron checkpoint
    TOKENIZER: Final = "tokenizer"  # prepare/teacher: the teacher's tokenizer directory
    TRAIN: Final = "train"  # prepare/data: the training blend [[weight, indexed prefix], ...]
    CALIBRATION: Final = "calibration"  # prepare/data: indexed prefix
    HELDOUT: Final = "heldout"  # prepare/data: indexed prefix
    EVAL: Final = "eval"  # evaluations: the JSON result
    IMPORTANCE: Final = "importance"  # <stage>/importance: the importance file
    PLAN: Final = "plan"  # <stage>/plan: the compression plan
    PLOTS: Final = "plots"  # <stage>/plan: list of plot paths
    CHECKPOINT: Final = "checkpoint"  # <stage>/prune, init, distill: the stage's student
    STEPS: Final = "steps"  # <stage>/distill: training steps done (an int)
    METRICS: Final = "metrics"  # <stage>/distill: metrics.jsonl
    DATA_SAMPLES: Final = "data_samples"  # <stage>/distill: [first, end) of the run's data stream it trained on
    HF: Final = "hf"  # final/export: the HF checkpoint
    BENCH: Final = "bench"  # final/bench_inference: the efficiency figures
    REPORT: Final = "report"  # final/report: report.md


def variant_dir(workdir: Path, name: str | None) -> Path:
    """A variant's own work dir (a recipe without variants runs in `workdir` itself)."""
    return workdir if name is None else workdir / VARIANTS / name


def shared_dir(workdir: Path) -> Path:
    """Where the steps variants share keep their record and outputs."""
    return workdir / SHARED


def input_step(recipe: Recipe, stage: Stage) -> str:
    """The step whose checkpoint a stage compresses: the teacher's, or the previous stage's distillation."""
    i = recipe.stages.index(stage)
    return TEACHER if i == 0 else stage_steps(recipe.stages[i - 1]).distill


def student_step(recipe: Recipe, stage: Stage) -> str:
    """The step that makes a stage's student before training: pruning, or for the first stage of an
    `init: random` recipe, a random initialisation of the same shape."""
    return stage_steps(stage).init if random_student(recipe, stage) else stage_steps(stage).prune


def random_student(recipe: Recipe, stage: Stage) -> bool:
    """Whether the stage's student is initialised at random (the first stage of an `init: random` recipe)."""
    return recipe.init == "random" and stage is recipe.stages[0]
