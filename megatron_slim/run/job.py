"""Run a recipe (`RunJob`, `run_recipe`), as the `run` command and the demo do: list its stages, print a dry run,
run one single-process step (the child of a multi-rank job), or run the steps on the launched ranks, spawning the
recipe's `nproc` local ranks as a plain process."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_slim.models.config import ModelConfig
from megatron_slim.run.recipe import Recipe


@dataclass(frozen=True)
class RunJob:
    """The `run` command's flags, by the same names (progress: not --no-progress)."""

    recipe: Path
    workdir: Path
    stage: str | None = None  # run only this stage (earlier stages must be done)
    list_stages: bool = False  # print the stage names and return
    dry_run: bool = False  # validate the recipe and print the steps with their status
    step: str | None = None  # one single-process step (the child of a multi-rank job)
    progress: bool = True


def _prepare_workdir(recipe: Recipe, recipe_path: Path, workdir: Path) -> None:
    import yaml

    from megatron_slim.run.state import RunState

    workdir.mkdir(parents=True, exist_ok=True)
    RunState(workdir, recipe.digest)  # refuses a work dir of another recipe
    copy = workdir / "recipe.yaml"
    if not copy.is_file():
        copy.write_text(yaml.safe_dump(yaml.safe_load(recipe_path.read_text()), sort_keys=False))


def _dry_run(recipe: Recipe, workdir: Path, configs: list[ModelConfig]) -> None:
    from megatron_slim.compress.accounting import account, human
    from megatron_slim.run.state import RunState
    from megatron_slim.run.steps import all_steps

    state = RunState(workdir, recipe.digest) if (workdir / "state.json").is_file() else None
    for stage, cfg in zip(recipe.stages, configs):
        acc = account(cfg)
        print(f"stage {stage.name}: {cfg.num_layers} layers ({cfg.hybrid_pattern}), hidden {cfg.hidden_size}, "
              f"{cfg.num_experts} experts top-{cfg.topk}; {human(acc.total)} params, {human(acc.active)} active")
    for step in all_steps(recipe):
        print(f"  {step.id:<28} {state.status(step.id) if state else 'pending'}")


def _worker(job: RunJob) -> int:
    from megatron_slim.run.recipe import load_recipe
    from megatron_slim.run.runner import run_steps

    recipe = load_recipe(job.recipe)
    return run_steps(recipe, job.recipe, job.workdir, job.stage, progress=job.progress)


def run_recipe(job: RunJob) -> int:
    """Do what the job asks; the exit status (75 when a stop signal interrupted the run: requeue it)."""
    from megatron_slim.run.recipe import load_recipe, validate
    from megatron_slim.runtime.spawn import launched_world_size, run_local_world

    recipe_path, workdir = job.recipe, job.workdir
    if job.list_stages:
        from megatron_slim.run.recipe import parse_recipe
        from megatron_slim.runtime.config_loader import load_yaml

        for stage in parse_recipe(load_yaml(recipe_path), recipe_path.parent).stages:
            print(stage.name)
        return 0
    recipe = load_recipe(recipe_path)
    if job.step:
        from megatron_slim.run.runner import run_one_step

        return run_one_step(recipe, workdir, job.step, progress=job.progress)
    if job.dry_run:
        _dry_run(recipe, workdir, validate(recipe))
        return 0
    _prepare_workdir(recipe, recipe_path, workdir)
    world = launched_world_size()
    if world is None and recipe.nproc > 1:
        return run_local_world(_worker, recipe.nproc, job)
    if world is not None:
        from megatron_slim.errors import UserError
        from megatron_slim.runtime.distributed import ParallelConfig

        p = recipe.parallel
        try:
            ParallelConfig(tp=p.tp, ep=p.ep, pp=p.pp).validate_world(world)
        except ValueError as e:
            raise UserError(f"{world} launched ranks do not fit the recipe's parallel layout: {e}") from None
    return _worker(job)
