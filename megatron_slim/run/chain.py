"""The jobs of a SLURM chain that keeps GPUs busy (`launch.sh --submit --chain --cpu-partition P`).

A run's steps, in order, are cut into maximal runs of steps that belong on the same kind of node (`Step.where`):
CPU jobs do the heavy single-process work (teacher conversion, tokenization, pruning, export) on one CPU node, GPU
jobs the distributed work (importance, evaluation, distillation, the inference bench); light single-process steps
(planning, the report) join the job before them. Each job depends on the one before it, so a job of the chain
never waits on hardware it does not use: a two-stage recipe becomes `prepare` (cpu), `depth.importance` (gpu:
the teacher's evaluation and the first stage's importance), `depth.prune` (cpu), `depth` (gpu: the stage's
evaluation and distillation, and the next stage's importance), `width.prune` (cpu), `width` (gpu),
`final.export` (cpu).

With variants, the steps variants share come first as `shared.<job>` jobs; then each variant's own steps form its
own chain, `VARIANT/<job>`, after the last shared job (what `launch.sh` submits side by side).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from megatron_slim.run.step_groups import PREPARE
from megatron_slim.run.steps import ANY, CPU, GPU, Step

SHARED_PREFIX = "shared."


class VariantSteps(Protocol):
    """What the chain needs of a variant's run (runner.VariantRun): its name, its steps in order, and which of
    them are shared (step id -> shared record id)."""

    name: str | None
    steps: list[Step]
    shared: dict[str, str]


@dataclass(frozen=True)
class ChainJob:
    """One job of the chain: its name, the kind of node it runs on (CPU or GPU) and its steps in run order, each
    as (variant, step id): the variant whose run executes it (None for a recipe without variants)."""

    name: str
    where: str
    steps: tuple[tuple[str | None, str], ...]

    def line(self) -> str:
        """What `run --list-jobs` prints and `launch.sh --stages` reads: NAME:cpu or NAME:gpu."""
        return f"{self.name}:{self.where}"


def _name(where: str, steps: list[Step]) -> str:
    """A CPU job is named after its first heavy step (`prepare` for the preparation), a GPU job after the stage it
    distills, else after its last distributed step (`depth.importance`, `final.bench_inference`)."""
    if where == CPU:
        first = next(s for s in steps if s.where == CPU)
        return PREPARE if first.group == PREPARE else f"{first.group}.{first.kind}"
    distill = next((s for s in steps if s.kind == "distill"), None)
    if distill is not None:
        return distill.group
    last = [s for s in steps if s.where == GPU][-1]
    return f"{last.group}.{last.kind}"


def _cut(items: list[tuple[str | None, Step]], prefix: str) -> list[ChainJob]:
    segments: list[tuple[str, list[tuple[str | None, Step]]]] = []
    leading: list[tuple[str | None, Step]] = []  # light steps before the first placed one
    for variant, step in items:
        if step.where == ANY:
            (segments[-1][1] if segments else leading).append((variant, step))
        elif segments and segments[-1][0] == step.where:
            segments[-1][1].append((variant, step))
        else:
            segments.append((step.where, leading + [(variant, step)]))
            leading = []
    if leading:  # nothing but light steps: one process on a CPU node does them
        segments.append((CPU, leading))
    jobs = []
    for where, members in segments:
        steps = [s for _, s in members]
        name = _name(where, steps) if any(s.where != ANY for s in steps) else f"{steps[0].group}.{steps[0].kind}"
        jobs.append(ChainJob(prefix + name, where, tuple((v, s.id) for v, s in members)))
    return jobs


def chain_jobs(runs: list[VariantSteps]) -> list[ChainJob]:
    """The chain's jobs in submission order (each after the one before it; a variant's first job after the last
    shared one). Names are unique: a repeated one gets a numeric suffix."""
    shared: list[tuple[str | None, Step]] = []
    seen: set[str] = set()
    for run in runs:
        for step in run.steps:
            record = run.shared.get(step.id)
            if record is not None and record not in seen:
                seen.add(record)
                shared.append((run.name, step))
    jobs = _cut(shared, SHARED_PREFIX)
    for run in runs:
        own = [(run.name, s) for s in run.steps if s.id not in run.shared]
        jobs += _cut(own, f"{run.name}/" if run.name else "")
    names: dict[str, int] = {}
    unique = []
    for job in jobs:
        names[job.name] = names.get(job.name, 0) + 1
        n = names[job.name]
        unique.append(job if n == 1 else ChainJob(f"{job.name}.{n}", job.where, job.steps))
    return unique


def job_of_step(runs: list[VariantSteps], variant: str | None, step_id: str) -> ChainJob | None:
    """The chain job that runs a variant's step (for messages that tell where a step belongs)."""
    run = next(r for r in runs if r.name == variant)
    record = run.shared.get(step_id)
    for job in chain_jobs(runs):
        for v, s in job.steps:
            if (v, s) == (variant, step_id):
                return job
            if record is not None and next(r for r in runs if r.name == v).shared.get(s) == record:
                return job
    return None
