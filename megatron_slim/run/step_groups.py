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

from pathlib import Path

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
REPORT = f"{FINAL}/report"


def variant_dir(workdir: Path, name: str | None) -> Path:
    """A variant's own work dir (a recipe without variants runs in `workdir` itself)."""
    return workdir if name is None else workdir / VARIANTS / name


def shared_dir(workdir: Path) -> Path:
    """Where the steps variants share keep their record and outputs."""
    return workdir / SHARED


def input_step(recipe: Recipe, stage: Stage) -> str:
    """The step whose checkpoint a stage compresses: the teacher's, or the previous stage's distillation."""
    i = recipe.stages.index(stage)
    return TEACHER if i == 0 else f"{recipe.stages[i - 1].name}/distill"


def student_step(recipe: Recipe, stage: Stage) -> str:
    """The step that makes a stage's student before training: pruning, or for the first stage of an
    `init: random` recipe, a random initialisation of the same shape."""
    random = recipe.init == "random" and stage is recipe.stages[0]
    return f"{stage.name}/{'init' if random else 'prune'}"
