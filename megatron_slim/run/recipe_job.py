"""Run a recipe (`RunJob`, `run_recipe`), as the `run` command and the demo do: list its stages or its chain's jobs,
print a dry run, run one single-process step (the child of a multi-rank job), or run the steps (all, one stage's or
one chain job's) on the launched ranks, spawning the recipe's `nproc` local ranks as a plain process."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from megatron_slim.errors import UserError
from megatron_slim.run.recipe_schema import Study
from megatron_slim.run.state import RunView
from megatron_slim.run.step_groups import SHARED
from megatron_slim.runtime.config_loader import setting

RECIPE_COPY = "run.recipe.yaml"  # the run's own copy of its recipe in the work dir (`export --run` reads it)


@dataclass(frozen=True, kw_only=True)
class RunJob:
    """The `run` command's flags, by the same names (progress: not --no-progress)."""

    recipe: Path = setting(help="recipe YAML (see examples/slimqwen/recipe.yaml and "
                                "megatron_slim/run/recipe_schema.py)", positional=True)
    workdir: Path = setting(help="directory for every output and the run's state")
    stage: str | None = setting(None, help="run only this stage (earlier stages must be done); with variants "
                                           "VARIANT/STAGE, or `shared` for only the steps variants share (what "
                                           "--list-stages prints)")
    variant: str | None = setting(None, help="run only this variant of a recipe that declares variants (default: "
                                             "every variant in turn; steps they share run once)")
    list_stages: bool = setting(False, help="print the stage names, one per line, and exit (with variants: `shared`, "
                                            "then VARIANT/STAGE)")
    dry_run: bool = setting(False, help="validate the recipe and print the steps with their status and each stage's "
                                        "student")
    gpu_memory: str | None = setting(None, help="memory of one GPU (e.g. 80GiB; default: the recipe's "
                                                "cluster.gpu_memory): a stage whose memory plan does not fit is "
                                                "refused before anything runs")
    fresh: bool = setting(False, help="remove the work dir's contents first and run every step again (only a work "
                                      "dir `run` created, holding none of the run's inputs)")
    list_jobs: bool = setting(False, help="print the jobs of a chain that keeps GPUs busy, one NAME:cpu or NAME:gpu "
                                          "per line, and exit (what `launch.sh --submit --chain --cpu-partition P` "
                                          "submits)")
    job: str | None = setting(None, help="run only this job of --list-jobs (the jobs before it must be done)")
    allow_single_process_steps: bool = setting(False, help="in a job spanning several nodes, run the single-process "
                                                           "steps (teacher conversion, tokenization, pruning, export) "
                                                           "here anyway, while the other GPUs wait (refused by "
                                                           "default)")
    step: str | None = setting(None, help="one single-process step (internal: the child of a multi-rank job)",
                               hidden=True)
    progress: bool = setting(True, help="no progress bars")

    def target(self) -> tuple[str | None, str | None]:
        """(variant, stage), reading `--stage VARIANT/STAGE` as `--variant VARIANT --stage STAGE`."""
        if self.stage and "/" in self.stage:
            variant, stage = self.stage.split("/", 1)
            if self.variant and self.variant != variant:
                raise UserError(f"--stage {self.stage} names variant {variant!r}, --variant {self.variant!r}")
            return variant, stage
        return self.variant, self.stage


def _prepare_workdir(study: Study, recipe_path: Path, workdir: Path) -> None:
    """Under the work dir's lock: refuse a work dir of another recipe, and keep the run's copy of the recipe,
    `RECIPE_COPY`, never the user's file (a recipe is never written back, even when it sits in the work dir)."""
    import yaml

    from megatron_slim.run.state import STATE, RunState
    from megatron_slim.run.variants import plan_runs
    from megatron_slim.runtime.outputs import atomic_write

    if study.variants and (workdir / STATE).is_file():
        raise UserError(f"{workdir} holds a run of a recipe without variants; use another --workdir")
    for run in plan_runs(study, workdir):
        RunState(run.workdir, run.recipe.digest)  # refuses a work dir of another recipe (or variant)
    copy = workdir / RECIPE_COPY
    if copy.resolve() == recipe_path.resolve():
        return
    if not copy.is_file() or study.variants:  # variants may be added to a study: keep the latest
        atomic_write(copy, yaml.safe_dump(yaml.safe_load(recipe_path.read_text()), sort_keys=False))


@contextmanager
def _workdir_locks(study: Study, workdir: Path, variant: str | None) -> Iterator[None]:
    """One writer per run work dir: the lock of each variant's work dir this job runs (the work dir itself for a
    recipe without variants), held by this process (it runs the steps or spawns the ranks that do). Jobs running
    different variants of one study may run at once; their shared steps have their own lock (runner.py)."""
    from megatron_slim.run.variants import plan_runs
    from megatron_slim.runtime.outputs import workdir_lock

    with ExitStack() as stack:
        for run in plan_runs(study, workdir):
            if variant is None or run.name == variant:
                stack.enter_context(workdir_lock(run.workdir))
        yield


def list_stages(study: Study) -> list[str]:
    """What `--list-stages` prints: the stage names; with variants, `shared` (the steps variants share) and then
    VARIANT/STAGE for each variant's stages (what `launch.sh --submit --chain` submits, one job each)."""
    if not study.variants:
        return [s.name for s in study.recipe(None).stages]
    return [SHARED] + [f"{name}/{s.name}" for name in study.variants for s in study.recipe(name).stages]


def _memory_check(study: Study, variant: str | None, gpu_memory: str | None, show: bool) -> None:
    """Every stage of every variant (or `variant`'s): its per-GPU memory plan, printed when `show`; a stage that
    does not fit refuses the whole run before any compute."""
    from megatron_slim.run.memory import check_fit, plans, stage_setups
    from megatron_slim.run.recipe_check import stage_configs, teacher_config
    from megatron_slim.train.memory_plan import format_plans

    for name, recipe in study.recipes.items():
        if variant is not None and name != variant:
            continue
        teacher = teacher_config(recipe)
        setups = stage_setups(recipe, teacher, stage_configs(recipe, teacher), gpu_memory)
        stage_plans = plans(setups)
        if show:
            print(f"memory per GPU{f' (variant {name})' if name else ''}, {setups[0].world} GPUs, layout "
                  f"tp={setups[0].layout.tp} pp={setups[0].layout.pp} ep={setups[0].layout.ep} "
                  f"etp={setups[0].layout.expert_tp}:")
            print(format_plans(stage_plans))
        check_fit(setups, stage_plans, f"variant {name!r} " if name else "the recipe ")


def _dry_run(study: Study, workdir: Path, variant: str | None) -> None:
    from megatron_slim.compress.accounting import account, human
    from megatron_slim.run.recipe_check import validate
    from megatron_slim.run.report import data_stream_lines
    from megatron_slim.run.state import STATE, RunState
    from megatron_slim.run.step_groups import shared_dir
    from megatron_slim.run.variants import plan_runs, shared_state

    shared = shared_state(workdir) if (shared_dir(workdir) / STATE).is_file() else None
    for run in plan_runs(study, workdir):
        if variant is not None and run.name != variant:
            continue
        if run.name is not None:
            print(f"variant {run.name} ({run.workdir}){' [reference]' if run.name == study.reference else ''}")
        for stage, cfg in zip(run.recipe.stages, validate(run.recipe)):
            acc = account(cfg)
            print(f"stage {stage.name}: {cfg.num_layers} layers ({cfg.hybrid_pattern}), hidden {cfg.hidden_size}, "
                  f"{cfg.num_experts} experts top-{cfg.topk}; {human(acc.total)} params, {human(acc.active)} active")
        own = RunState(run.workdir, run.recipe.digest) if (run.workdir / STATE).is_file() else None
        view = RunView(own, shared, run.shared) if own is not None else None
        print("\n".join(data_stream_lines(run.recipe, view)))  # refuses a blend too small for the stream
        for step in run.steps:
            where = f"  shared {run.shared[step.id]}" if step.id in run.shared else ""
            if view is not None:
                status = view.status(step.id)
            elif step.id in run.shared and shared is not None:
                status = shared.status(run.shared[step.id])
            else:
                status = "pending"
            print(f"  {step.id:<28} {status}{where}")


@contextmanager
def _guarded(study: Study, job: RunJob) -> Iterator[None]:
    """The work dir cleared (`--fresh`: only one `run` made), created (runtime.outputs.prepare_workdir: not an
    input nor inside one), locked (`_workdir_locks`) and prepared (`_prepare_workdir`) for the body."""
    from megatron_slim.runtime.outputs import clear_workdir, prepare_workdir

    if job.fresh:
        clear_workdir(job.workdir, owner="run", inputs=[job.recipe])
    prepare_workdir(job.workdir, owner="run", inputs=[job.recipe])
    with _workdir_locks(study, job.workdir, job.target()[0]):
        _prepare_workdir(study, job.recipe, job.workdir)
        yield


def _worker(job: RunJob, guard_here: bool) -> int:
    """A rank's run; `guard_here`: rank 0 prepares and locks the work dir (launched ranks; a plain process that
    spawns its ranks has done it already)."""
    import torch.distributed as dist

    from megatron_slim.run.recipe_check import load_study
    from megatron_slim.run.runner import run_steps

    variant, stage = job.target()
    study = load_study(job.recipe)
    if job.job is not None:
        from megatron_slim.run.runner import run_job

        code = run_job(study, job.recipe, job.workdir, job.job, progress=job.progress,
                       allow_single=job.allow_single_process_steps)
    else:
        code = run_steps(study, job.recipe, job.workdir, variant, stage, progress=job.progress,
                         allow_single=job.allow_single_process_steps,
                         guard=(lambda: _guarded(study, job)) if guard_here else None)
    if study.variants and dist.get_rank() == 0:  # with whatever has finished, by every job of the study
        from megatron_slim.run.compare import write_comparison

        print(f"[run] comparison of the variants: {write_comparison(study, job.workdir)}", flush=True)
    return code


def run_recipe(job: RunJob) -> int:
    """Do what the job asks; the exit status (75 when a stop signal interrupted the run: requeue it)."""
    from megatron_slim.run.recipe_check import load_study
    from megatron_slim.run.recipe_parse import read_study
    from megatron_slim.runtime.spawn import launched_world_size, run_local_world

    recipe_path, workdir = job.recipe, job.workdir
    if job.list_stages:
        print("\n".join(list_stages(read_study(recipe_path))))
        return 0
    if job.list_jobs:
        from megatron_slim.run.chain import chain_jobs
        from megatron_slim.run.variants import plan_runs

        print("\n".join(j.line() for j in chain_jobs(plan_runs(read_study(recipe_path), workdir))))
        return 0
    if job.job is not None and (job.stage or job.variant):
        raise UserError("--job names one job of the chain (what --list-jobs prints); give no --stage/--variant")
    if job.job is not None and job.fresh:
        raise UserError("--fresh clears the whole work dir: start the chain over with `run --fresh`, not one --job")
    study = load_study(recipe_path)
    variant, _ = job.target()
    if variant is not None:
        study.recipe(variant)
    if job.step:
        from megatron_slim.run.runner import run_one_step

        return run_one_step(study, workdir, variant, job.step, progress=job.progress)
    if job.dry_run:
        _dry_run(study, workdir, variant)
        _memory_check(study, variant, job.gpu_memory, show=True)
        return 0
    if job.gpu_memory or any(r.cluster.gpu_memory for r in study.recipes.values()):
        _memory_check(study, variant, job.gpu_memory, show=False)
    nprocs = {r.nproc for r in study.recipes.values()}
    if len(nprocs) > 1:
        raise UserError(f"variants disagree on nproc {sorted(nprocs)}: one job runs them all")
    world = launched_world_size()
    if world is not None:
        for layout in {r.parallel for r in study.recipes.values()}:
            try:
                layout.validate_world(world)
            except ValueError as e:
                raise UserError(f"{world} launched ranks do not fit the recipe's parallel layout: {e}") from None
    nproc = nprocs.pop()
    if job.job is not None:
        # the jobs of a chain run in the order their dependencies give, a CPU job beside a GPU job: they share the
        # work dir without its lock
        from megatron_slim.runtime.outputs import prepare_workdir

        prepare_workdir(workdir, owner="run", inputs=[recipe_path])
        _prepare_workdir(study, recipe_path, workdir)
        if world is None and nproc > 1:
            return run_local_world(_worker, nproc, job, False)
        return _worker(job, False)
    if world is None:  # this process runs the steps or spawns the ranks: it holds the work dir's lock
        with _guarded(study, job):
            if nproc > 1:
                return run_local_world(_worker, nproc, job, False)
            return _worker(job, False)
    return _worker(job, True)  # launched ranks: rank 0 prepares and locks once the process group exists
