"""Names of the step groups around a run's stages (a step id is `<group>/<name>`), and which step a stage reads
its model from: shared by the steps, the runner and the report, which reads finished steps by id."""
from __future__ import annotations

from megatron_slim.run.recipe import Recipe, Stage

PREPARE = "prepare"
FINAL = "final"


def input_step(recipe: Recipe, stage: Stage) -> str:
    """The step whose checkpoint a stage compresses: the teacher's, or the previous stage's distillation."""
    i = recipe.stages.index(stage)
    return f"{PREPARE}/teacher" if i == 0 else f"{recipe.stages[i - 1].name}/distill"


def student_step(recipe: Recipe, stage: Stage) -> str:
    """The step that makes a stage's student before training: pruning, or for the first stage of an
    `init: random` recipe, a random initialisation of the same shape."""
    random = recipe.init == "random" and stage is recipe.stages[0]
    return f"{stage.name}/{'init' if random else 'prune'}"
