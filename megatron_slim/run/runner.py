"""Execute a recipe's steps in order on every rank of the job, skipping finished ones.

All ranks walk the same step list. Distributed steps (importance, distillation, evaluation) run in this process on
every rank, each setting up its own model-parallel layout on the job's process group. Single-process steps
(conversion, tokenization, planning, pruning, export, report) run on rank 0 while the others wait at a barrier;
in a multi-rank job rank 0 runs them in a child process outside the job's process group (the checkpoint writers
build a one-process model-parallel layout of their own). Only rank 0 writes the state; every rank rereads it
after each step, so the work dir must be on a file system all ranks share.

With variants (run/recipe.py), each variant's steps run in its own work dir `<workdir>/variants/<name>/`, and the
steps several variants share (run/steps.py: same key) run once, the first variant to reach one computing it under a
lock; after the variants, `<workdir>/report/compare.md` compares them (run/compare.py).
"""
from __future__ import annotations

import fcntl
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from megatron_slim.errors import UserError
from megatron_slim.run.recipe import Recipe, Study
from megatron_slim.run.state import RunState, RunView
from megatron_slim.run.step_groups import FINAL, PREPARE
from megatron_slim.run.steps import Context, Step, StepInterrupted, all_steps, step_keys
from megatron_slim.runtime.launch_env import without_launcher_env
from megatron_slim.runtime.preemption import REQUEUE_EXIT_CODE, StopFlag

SHARED = "shared"  # <workdir>/shared/: steps that variants share, with their own state.json
VARIANTS = "variants"  # <workdir>/variants/<name>/: each variant's own work dir


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
        return root / SHARED / self.shared[step.id].split("@")[1]


def plan_runs(study: Study, workdir: Path) -> list[VariantRun]:
    """Every variant's steps; a step whose key (steps.step_keys) two variants agree on is shared, recorded as
    `<kind>@<key>` in <workdir>/shared/state.json. A recipe without variants is one run in `workdir` itself."""
    runs = []
    for name, recipe in study.recipes.items():
        steps = all_steps(recipe)
        keys = step_keys(steps)
        runs.append(VariantRun(name, recipe, workdir if name is None else workdir / VARIANTS / name, steps,
                               {s.id: f"{s.kind}@{keys[s.id]}" for s in steps}))
    users = Counter(record for run in runs for record in set(run.shared.values()))
    for run in runs:
        run.shared = {step: record for step, record in run.shared.items() if users[record] > 1}
    return runs


def shared_state(workdir: Path) -> RunState:
    return RunState(workdir / SHARED, SHARED)


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
    code = subprocess.run(cmd, env=without_launcher_env()).returncode
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
    path = root / SHARED / ".lock"
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


def _run_variant(run: VariantRun, recipe_path: Path, root: Path, stage: str | None, stop: StopFlag,
                 progress: bool) -> int:
    label = f"variant {run.name}: " if run.name else ""
    for step in select_steps(run, run.view(shared_state(root) if run.shared else None), stage):
        view = run.view(shared_state(root) if run.shared else None)  # rank 0 (or its child) wrote it
        if view.done(step.id):
            _log(f"skip  {label}{step.id} (done{', shared' if step.id in run.shared else ''})")
            continue
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
              progress: bool = True) -> int:
    """Called on every rank: the steps of one variant (or of the plain recipe), or of every variant in turn.
    Returns 0, or the requeue status when distillation was preempted."""
    from megatron_slim.runtime.distributed import init_distributed

    # the recipe's timeout: how long a collective (and the other ranks, at a barrier, for rank 0's single-process
    # steps) may wait before the job fails instead of holding its nodes
    init_distributed(timeout_minutes=next(iter(study.recipes.values())).timeout_minutes)
    stop = StopFlag()  # a preemption signal between distillation steps stops the run at the next step boundary
    runs = plan_runs(study, workdir)
    if variant is not None:
        study.recipe(variant)  # names the variants when there is no such one
    for run in runs:
        if variant is not None and run.name != variant:
            continue
        code = _run_variant(run, recipe_path, workdir, stage, stop, progress)
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
