"""Run a compression recipe end to end: per stage importance -> plan -> prune/merge -> distill -> evaluate, then
export the final student to HF and write the report (see megatron_slim/run/recipe.py for the recipe format).

Every step's status and outputs are recorded in <workdir>/state.json: rerunning the same command skips finished
steps and resumes a half-trained stage from its newest checkpoint, so it is safe to rerun after a crash, a kill or
a preemption. SIGTERM/SIGUSR1 (SLURM's warning) let the current step finish (distillation checkpoints at its next
step) and the run exits with status 75, on which launch.sh requeues it. The recipe is
validated completely (keys, files, every stage's shapes, run configs) before anything runs.

Under torchrun/srun the given ranks are used; as a plain process it spawns the recipe's `nproc` local ranks.
`--stage NAME` runs one stage (the first also prepares, the last also exports and reports): what
`launch.sh --submit --chain` submits as one SLURM job per stage.
"""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "run a recipe (stages of importance/plan/prune/distill/evaluate, export, report); idempotent, resumable"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML (see examples/slimqwen/recipe.yaml and megatron_slim/run/recipe.py)")
    p.add_argument("--workdir", required=True, help="directory for every output and the run's state")
    p.add_argument("--stage", help="run only this stage (earlier stages must be done)")
    p.add_argument("--list-stages", action="store_true", help="print the stage names, one per line, and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the recipe and print the steps with their status and each stage's student")
    p.add_argument("--step", help=argparse.SUPPRESS)  # internal: one single-process step (child of a multi-rank job)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _prepare_workdir(recipe, recipe_path: Path, workdir: Path) -> None:
    import yaml

    from megatron_slim.run.state import RunState

    workdir.mkdir(parents=True, exist_ok=True)
    RunState(workdir, recipe.digest)  # refuses a work dir of another recipe
    copy = workdir / "recipe.yaml"
    if not copy.is_file():
        copy.write_text(yaml.safe_dump(yaml.safe_load(recipe_path.read_text()), sort_keys=False))


def _dry_run(recipe, workdir: Path, configs) -> None:
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


def _worker(args: argparse.Namespace) -> int:
    from megatron_slim.run.recipe import load_recipe
    from megatron_slim.run.runner import run_steps

    recipe = load_recipe(args.recipe)
    return run_steps(recipe, Path(args.recipe), Path(args.workdir), args.stage, progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    from megatron_slim.run.recipe import load_recipe, validate
    from megatron_slim.runtime.spawn import launched_world_size, run_local_world

    recipe_path, workdir = Path(args.recipe), Path(args.workdir)
    if args.list_stages:
        from megatron_slim.run.recipe import parse_recipe
        import yaml

        for stage in parse_recipe(yaml.safe_load(recipe_path.read_text()), recipe_path.parent).stages:
            print(stage.name)
        return 0
    recipe = load_recipe(recipe_path)
    if args.step:
        from megatron_slim.run.runner import run_one_step

        return run_one_step(recipe, workdir, args.step, progress=not args.no_progress)
    if args.dry_run:
        _dry_run(recipe, workdir, validate(recipe))
        return 0
    _prepare_workdir(recipe, recipe_path, workdir)
    world = launched_world_size()
    if world is None and recipe.nproc > 1:
        return run_local_world(_worker, recipe.nproc, args)
    if world is not None:
        from megatron_slim.errors import UserError
        from megatron_slim.runtime.distributed import ParallelConfig

        p = recipe.parallel
        try:
            ParallelConfig(tp=p.tp, ep=p.ep, pp=p.pp).validate_world(world)
        except ValueError as e:
            raise UserError(f"{world} launched ranks do not fit the recipe's parallel layout: {e}") from None
    return _worker(args)
