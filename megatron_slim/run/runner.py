"""Execute a recipe's steps in order on every rank of the job, skipping finished ones.

All ranks walk the same step list. Distributed steps (importance, distillation, evaluation) run in this process on
every rank, each setting up its own model-parallel layout on the job's process group. Single-process steps
(conversion, tokenization, planning, pruning, export, report) run on rank 0 while the others wait at a barrier;
in a multi-rank job rank 0 runs them in a child process outside the job's process group (the checkpoint writers
build a one-process model-parallel layout of their own). Only rank 0 writes the state; every rank rereads it
after each step, so the work dir must be on a file system all ranks share.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch.distributed as dist

from megatron_slim.errors import UserError
from megatron_slim.run.recipe import Recipe
from megatron_slim.run.state import RunState
from megatron_slim.run.step_groups import FINAL, PREPARE
from megatron_slim.run.steps import Context, Step, StepInterrupted, all_steps
from megatron_slim.runtime.launch_env import without_launcher_env
from megatron_slim.runtime.preemption import REQUEUE_EXIT_CODE, StopFlag

# How long ranks wait for rank 0's single-process steps (pruning an 80B checkpoint takes a while).
BARRIER_TIMEOUT_MINUTES = 24 * 60


def select_steps(recipe: Recipe, state: RunState, stage: str | None) -> list[Step]:
    """The steps of the whole run, or of one stage (the first stage also prepares, the last also exports)."""
    steps = all_steps(recipe)
    if stage is None:
        return steps
    names = [s.name for s in recipe.stages]
    if stage not in names:
        raise UserError(f"no stage {stage!r} in the recipe (stages: {names})")
    i = names.index(stage)
    unfinished = [s.id for s in steps if s.group in names[:i] + ([PREPARE] if i else []) and not state.done(s.id)]
    if unfinished:
        raise UserError(f"stage {stage!r} needs the earlier stages finished; not done: {unfinished}")
    groups = {stage} | ({PREPARE} if i == 0 else set()) | ({FINAL} if i == len(names) - 1 else set())
    return [s for s in steps if s.group in groups]


def _log(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[run] {msg}", flush=True)


def _single_in_child(recipe_path: Path, workdir: Path, step: Step, progress: bool) -> None:
    cmd = [sys.executable, "-m", "megatron_slim.cli", "run", str(recipe_path), "--workdir", str(workdir),
           "--step", step.id, *([] if progress else ["--no-progress"])]
    code = subprocess.run(cmd, env=without_launcher_env()).returncode
    if code:
        raise RuntimeError(f"step {step.id} failed in its child process (exit status {code}); see the output above")


def _execute(ctx: Context, step: Step) -> None:
    """Run one step here, recording it (rank 0)."""
    rank0 = dist.get_rank() == 0
    if rank0:
        ctx.state.start(step.id)
    t0 = time.time()
    try:
        outputs = step.fn(ctx)
    except StepInterrupted:
        if rank0:
            ctx.state.fail(step.id, "interrupted (checkpointed; rerun to resume)", status="interrupted")
        raise
    except BaseException as e:
        if rank0:
            ctx.state.fail(step.id, "".join(traceback.format_exception_only(e)).strip())
        raise
    if rank0:
        ctx.state.finish(step.id, outputs)
    _log(f"done  {step.id} ({time.time() - t0:.1f} s)")


def run_steps(recipe: Recipe, recipe_path: Path, workdir: Path, stage: str | None = None, progress: bool = True) -> int:
    """Called on every rank. Returns 0, or the requeue status when distillation was preempted."""
    from megatron_slim.runtime.distributed import init_distributed

    init_distributed(timeout_minutes=BARRIER_TIMEOUT_MINUTES)
    world = dist.get_world_size()
    stop = StopFlag()  # a preemption signal between distillation steps stops the run at the next step boundary
    ctx = Context(recipe, workdir, RunState(workdir, recipe.digest), progress)
    for step in select_steps(recipe, ctx.state, stage):
        if ctx.state.done(step.id):
            _log(f"skip  {step.id} (done)")
            continue
        if stop.agreed():
            _log(f"stop  before {step.id}: stop signal received; rerun the same command to resume")
            return REQUEUE_EXIT_CODE
        _log(f"start {step.id}")
        try:
            if not step.single:
                _execute(ctx, step)
            elif world == 1:
                _execute(ctx, step)
            else:
                ok = [True]
                if dist.get_rank() == 0:
                    try:
                        _single_in_child(recipe_path, workdir, step, progress)
                    except RuntimeError:
                        ok = [False]
                dist.broadcast_object_list(ok, src=0)
                if not ok[0]:
                    raise RuntimeError(f"step {step.id} failed")
        except StepInterrupted as e:
            _log(f"stop  {step.id}: checkpointed; rerun the same command to resume")
            return e.code
        dist.barrier()
        ctx.state = RunState(workdir, recipe.digest)  # rank 0 (or its child) wrote it
    return 0


def run_one_step(recipe: Recipe, workdir: Path, step_id: str, progress: bool = True) -> int:
    """A single-process step on its own (the child of a multi-rank job)."""
    from megatron_slim.runtime.distributed import init_distributed

    init_distributed()
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # the parent rank receives them too and stops after this step
        signal.signal(sig, signal.SIG_IGN)
    ctx = Context(recipe, workdir, RunState(workdir, recipe.digest), progress)
    steps = {s.id: s for s in all_steps(recipe)}
    if step_id not in steps:
        raise UserError(f"no step {step_id!r}; steps: {list(steps)}")
    _execute(ctx, steps[step_id])
    return 0
