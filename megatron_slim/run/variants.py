"""A study's variants as runs (`plan_runs`: each variant's steps, its work dir and the steps it shares with other
variants) and as views of what finished (`variant_views`): the one way the runner, the dry run, the comparison and
the ablation suite see a study's work dir (layout in run/step_groups.py)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from megatron_slim.run.recipe_schema import Recipe, Study
from megatron_slim.run.state import RunState, RunView
from megatron_slim.run.step_groups import SHARED, shared_dir, variant_dir
from megatron_slim.run.steps import Step, all_steps, step_keys


@dataclass
class VariantRun:
    """One variant's steps, its work dir and which of its steps are shared (step id -> shared record id)."""

    name: str | None
    recipe: Recipe
    workdir: Path
    steps: list[Step]
    shared: dict[str, str]

    def view(self, shared_state: RunState | None) -> RunView:
        return RunView(RunState(self.workdir, self.recipe.digest), shared_state, self.shared)

    def shared_dir(self, root: Path, step: Step) -> Path:
        return shared_dir(root) / self.shared[step.id].split("@")[1]


def plan_runs(study: Study, workdir: Path) -> list[VariantRun]:
    """Every variant's steps; a step whose key (steps.step_keys) two variants agree on is shared, recorded as
    `<kind>@<key>` in <workdir>/shared/state.json. A recipe without variants is one run in `workdir` itself."""
    runs = []
    for name, recipe in study.recipes.items():
        steps = all_steps(recipe)
        keys = step_keys(steps)
        runs.append(VariantRun(name, recipe, variant_dir(workdir, name), steps,
                               {s.id: f"{s.kind}@{keys[s.id]}" for s in steps}))
    users = Counter(record for run in runs for record in set(run.shared.values()))
    for run in runs:
        run.shared = {step: record for step, record in run.shared.items() if users[record] > 1}
    return runs


def shared_state(workdir: Path) -> RunState:
    return RunState(shared_dir(workdir), SHARED)


def variant_views(study: Study, workdir: Path) -> list[tuple[VariantRun, RunView]]:
    """Each variant's run with its view of the finished steps, shared ones included (none finished when the work
    dir holds no record yet), in recipe order."""
    shared = shared_state(workdir)
    return [(run, run.view(shared)) for run in plan_runs(study, workdir)]
