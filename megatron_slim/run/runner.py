"""Execute a recipe's steps in order on every rank of the job, skipping finished ones.

All ranks walk the same step list. Distributed steps (importance, distillation, evaluation) run in this process on
every rank, each setting up its own model-parallel layout on the job's process group. Single-process steps
(conversion, tokenization, planning, pruning, export, report) run on rank 0 while the others wait at a barrier;
in a multi-rank job rank 0 runs them in a child process outside the job's process group (the checkpoint writers
build a one-process model-parallel layout of their own). Only rank 0 writes the state; every rank rereads it
after each step, so the work dir must be on a file system all ranks share.

With variants (run/recipe_schema.py), each variant's steps run in its own work dir `<workdir>/variants/<name>/`, and the
steps several variants share (run/steps.py: same key) run once, the first variant to reach one computing it under a
lock; after the variants, `<workdir>/report/compare.md` compares them (run/compare.py).

In a job that spans several nodes, the heavy single-process steps (`Step.where == "cpu"`: conversion,
tokenization, pruning, export) are refused unless allowed: the job of a chain on CPU nodes (run/chain.py,
`run --job NAME`) does them while no GPU waits.
"""
from __future__ import annotations

import fcntl
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path

import torch.distributed as dist

from megatron_slim.errors import UserError
from megatron_slim.run.chain import chain_jobs, job_of_step
from megatron_slim.run.recipe_schema import Study
from megatron_slim.run.state import RunState, RunView
from megatron_slim.run.step_groups import FINAL, PREPARE, SHARED, shared_dir
from megatron_slim.run.steps import CPU, Context, Step, StepInterrupted
from megatron_slim.run.variants import VariantRun, plan_runs, shared_state
from megatron_slim.runtime.launch_env import without_launcher_env
from megatron_slim.runtime.lifetime import child_env
from megatron_slim.runtime.preemption import REQUEUE_EXIT_CODE, StopFlag
from megatron_slim.runtime.spawn import launched_nodes


def timeout_minutes(study: Study) -> float:
    """The recipe's process-group timeout: how long a collective (and the other ranks, at a barrier, for rank 0's
    single-process steps) may wait before the job fails instead of holding its nodes; the longest of the
    variants' (one job runs them all)."""
    return max(recipe.timeout_minutes for recipe in study.recipes.values())


def select_steps(run: VariantRun, view: RunView, stage: str | None) -> list[Step]:
    """The steps of the whole run, of one stage (the first stage also prepares, the last also exports), or with
    stage `shared`, only the steps shared with other variants."""
    steps, recipe = run.steps, run.recipe
    if stage is None:
        return steps
    if stage == SHARED:
        return [s for s in steps if s.id in run.shared]
    names = [s.name for s in recipe.stages]
    if stage not in names:
        raise UserError(f"no stage {stage!r} in the recipe (stages: {names})")
    i = names.index(stage)
    unfinished = [s.id for s in steps if s.group in names[:i] + ([PREPARE] if i else []) and not view.done(s.id)]
    if unfinished:
        raise UserError(f"stage {stage!r} needs the earlier stages finished; not done: {unfinished}")
    groups = {stage} | ({PREPARE} if i == 0 else set()) | ({FINAL} if i == len(names) - 1 else set())
    return [s for s in steps if s.group in groups]


def _log(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[run] {msg}", flush=True)


def _single_in_child(recipe_path: Path, workdir: Path, run: VariantRun, step: Step, progress: bool) -> None:
    cmd = [sys.executable, "-m", "megatron_slim.cli", "run", str(recipe_path), "--workdir", str(workdir),
           "--step", step.id, *(["--variant", run.name] if run.name else []), *([] if progress else ["--no-progress"])]
    code = subprocess.run(cmd, env=child_env(without_launcher_env())).returncode
    if code:
        raise RuntimeError(f"step {step.id} failed in its child process (exit status {code}); see the output above")


def _context(run: VariantRun, root: Path, step: Step, progress: bool) -> tuple[Context, RunState, str]:
    """The step's context and where its record goes: the variant's state, or the shared state."""
    shared = shared_state(root) if run.shared else None
    view = run.view(shared)
    if step.id in run.shared:
        return Context(run.recipe, run.shared_dir(root, step), view, progress), shared, run.shared[step.id]
    return Context(run.recipe, run.workdir, view, progress), view.own, step.id


def _execute(run: VariantRun, root: Path, step: Step, progress: bool) -> None:
    """Run one step here, recording it (rank 0)."""
    ctx, record, record_id = _context(run, root, step, progress)
    rank0 = dist.get_rank() == 0
    if rank0:
        record.start(record_id)
    t0 = time.time()
    try:
        outputs = step.fn(ctx)
    except StepInterrupted as e:
        if rank0:
            record.fail(record_id, e.reason, status=e.status)
        raise
    except BaseException as e:
        if rank0:
            record.fail(record_id, "".join(traceback.format_exception_only(e)).strip())
        raise
    if rank0:
        record.finish(record_id, outputs)
    _log(f"done  {step.id}{' (shared)' if step.id in run.shared else ''} ({time.time() - t0:.1f} s)")


@contextmanager
def _shared_lock(root: Path, step: Step) -> Iterator[None]:
    """Rank 0 holds <workdir>/shared/.lock while a shared step runs, so variants run as separate jobs never
    compute one shared step twice (the second waits, then finds it done)."""
    if dist.get_rank() != 0:
        yield
        return
    path = shared_dir(root) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"wait  {step.id}: another job is running a shared step ({path} is locked)")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_step(run: VariantRun, recipe_path: Path, root: Path, step: Step, progress: bool) -> None:
    if not step.single or dist.get_world_size() == 1:
        _execute(run, root, step, progress)
        return
    ok = [True]
    if dist.get_rank() == 0:
        try:
            _single_in_child(recipe_path, root, run, step, progress)
        except RuntimeError:
            ok = [False]
    dist.broadcast_object_list(ok, src=0)
    if not ok[0]:
        raise RuntimeError(f"step {step.id} failed")


class SingleProcessStepRefused(UserError):
    """A heavy single-process step asked of a multi-node job: its chain's CPU job should have done it."""


def _refuse_single_process_step(runs: list[VariantRun], run: VariantRun, root: Path, step: Step, nodes: int) -> None:
    job = job_of_step(runs, run.name, step.id)
    raise SingleProcessStepRefused(
        f"step {step.id} is single-process work that would keep the other GPUs of this {nodes}-node job idle: run "
        f"it on a CPU node first (`launch.sh --submit --chain --cpu-partition P` submits it as job "
        f"{job.name if job else '?'}; by hand: `megatron-slim run RECIPE --workdir {root} --job "
        f"{job.name if job else 'NAME'}`), or pass --allow-single-process-steps to run it here")


def _run_variant(runs: list[VariantRun], run: VariantRun, recipe_path: Path, root: Path, steps: list[Step],
                 stop: StopFlag, progress: bool, allow_single: bool) -> int:
    label = f"variant {run.name}: " if run.name else ""
    nodes = launched_nodes()
    for step in steps:
        view = run.view(shared_state(root) if run.shared else None)  # rank 0 (or its child) wrote it
        if view.done(step.id):
            _log(f"skip  {label}{step.id} (done{', shared' if step.id in run.shared else ''})")
            continue
        if view.status(step.id) == "done":
            _log(f"redo  {label}{step.id}: its outputs are gone: {view.missing(step.id)[:3]}")
        if step.where == CPU and nodes > 1 and not allow_single:
            _refuse_single_process_step(runs, run, root, step, nodes)
        if stop.agreed():
            _log(f"stop  before {label}{step.id}: stop signal received; rerun the same command to resume")
            return REQUEUE_EXIT_CODE
        _log(f"start {label}{step.id}")
        try:
            if step.id in run.shared:
                with _shared_lock(root, step):
                    done = [dist.get_rank() == 0 and shared_state(root).done(run.shared[step.id])]
                    dist.broadcast_object_list(done, src=0)
                    if not done[0]:
                        _run_step(run, recipe_path, root, step, progress)
                    dist.barrier()
            else:
                _run_step(run, recipe_path, root, step, progress)
        except StepInterrupted as e:
            _log(f"stop  {label}{step.id}: " + ("checkpointed; rerun the same command to resume"
                                                if e.status == "interrupted" else e.reason))
            return e.code
        dist.barrier()
    return 0


def run_steps(study: Study, recipe_path: Path, workdir: Path, variant: str | None = None, stage: str | None = None,
              progress: bool = True, allow_single: bool = False,
              guard: Callable[[], AbstractContextManager] | None = None) -> int:
    """Called on every rank: the steps of one variant (or of the plain recipe), or of every variant in turn.
    `guard`: what rank 0 holds around them (the work dir's preparation and lock, job.py) when no parent process
    holds it; its refusal ends every rank with it. Returns 0, or the requeue status when distillation was
    preempted."""
    from megatron_slim.runtime.distributed import init_distributed

    init_distributed(timeout_minutes=timeout_minutes(study))
    with ExitStack() as held:
        if guard is not None:
            refused = [None]
            if dist.get_rank() == 0:
                try:
                    held.enter_context(guard())
                except UserError as e:
                    refused = [str(e)]
            dist.broadcast_object_list(refused, src=0)
            if refused[0] is not None:
                raise UserError(refused[0])
        stop = StopFlag()  # a preemption signal between distillation steps stops the run at the next step boundary
        runs = plan_runs(study, workdir)
        if variant is not None:
            study.recipe(variant)  # names the variants when there is no such one
        for run in runs:
            if variant is not None and run.name != variant:
                continue
            steps = select_steps(run, run.view(shared_state(workdir) if run.shared else None), stage)
            code = _run_variant(runs, run, recipe_path, workdir, steps, stop, progress, allow_single)
            if code:
                return code
    return 0


def run_job(study: Study, recipe_path: Path, workdir: Path, name: str, progress: bool = True,
            allow_single: bool = False) -> int:
    """Called on every rank: the steps of one job of the chain (run/chain.py), after checking that the steps they
    read are done (by the jobs before it). Returns 0, or the requeue status when distillation was preempted."""
    from megatron_slim.runtime.distributed import init_distributed

    runs = plan_runs(study, workdir)
    jobs = {job.name: job for job in chain_jobs(runs)}
    if name not in jobs:
        raise UserError(f"no job {name!r} in the recipe's chain (jobs: {list(jobs)})")
    by_name = {run.name: run for run in runs}
    groups: list[tuple[VariantRun, list[Step]]] = []
    for variant, step_id in jobs[name].steps:
        run = by_name[variant]
        if not groups or groups[-1][0] is not run:
            groups.append((run, []))
        groups[-1][1].append(next(s for s in run.steps if s.id == step_id))

    def record(run: VariantRun, step_id: str) -> str:  # a shared step by its record: any variant may have run it
        return run.shared.get(step_id) or f"{run.name}:{step_id}"

    ours: set[str] = set()
    for run, steps in groups:
        view = run.view(shared_state(workdir) if run.shared else None)
        for step in steps:
            missing = [d for d in step.deps if record(run, d) not in ours and not view.done(d)]
            if missing:
                raise UserError(f"job {name!r} needs the jobs before it finished: step {step.id} reads {missing}, "
                                "not done")
            ours.add(record(run, step.id))
    init_distributed(timeout_minutes=timeout_minutes(study))
    stop = StopFlag()
    for run, steps in groups:
        code = _run_variant(runs, run, recipe_path, workdir, steps, stop, progress, allow_single)
        if code:
            return code
    return 0


def run_one_step(study: Study, workdir: Path, variant: str | None, step_id: str, progress: bool = True) -> int:
    """A single-process step on its own (the child of a multi-rank job)."""
    from megatron_slim.runtime.distributed import init_distributed

    init_distributed()
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # the parent rank receives them too and stops after this step
        signal.signal(sig, signal.SIG_IGN)
    study.recipe(variant)
    run = next(r for r in plan_runs(study, workdir) if r.name == variant)
    steps = {s.id: s for s in run.steps}
    if step_id not in steps:
        raise UserError(f"no step {step_id!r}; steps: {list(steps)}")
    _execute(run, workdir, steps[step_id], progress)
    return 0
