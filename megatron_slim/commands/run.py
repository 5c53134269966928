"""Run a compression recipe end to end: per stage importance -> plan -> prune/merge -> distill -> evaluate, then
export the final student to HF and write the report (see megatron_slim/run/recipe_schema.py for the recipe format).

Every step's status and outputs are recorded in <workdir>/state.json: rerunning the same command skips finished
steps and resumes a half-trained stage from its newest checkpoint, so it is safe to rerun after a crash, a kill or
a preemption. SIGTERM/SIGUSR1 (SLURM's warning) let the current step finish (distillation checkpoints at its next
step) and the run exits with status 75, on which launch.sh requeues it. The recipe is
validated completely (keys, files, every stage's shapes, run configs) before anything runs.

Under torchrun/srun the given ranks are used; as a plain process it spawns the recipe's `nproc` local ranks.
`--stage NAME` runs one stage (the first also prepares, the last also exports and reports): what
`launch.sh --submit --chain` submits as one SLURM job per stage. With `--cpu-partition P` the chain is finer
(`--list-jobs`, `--job NAME`, see megatron_slim/run/chain.py): the heavy single-process steps (teacher conversion,
tokenization, pruning, export) run as their own jobs on CPU nodes and the GPU jobs only run distributed steps. A
job that spans several nodes refuses those steps (its GPUs would idle for hours) unless given
--allow-single-process-steps.

A recipe with `variants` runs each variant in <workdir>/variants/<name>/ (`--variant NAME` one of them); steps
whose inputs agree across variants (teacher conversion, data, importance and plans a variant does not change) run
once, in <workdir>/shared/, and <workdir>/report/compare.md compares the variants against the reference.
"""
from __future__ import annotations

import argparse

from megatron_slim.commands.options import add_job_arguments, job_from_args
from megatron_slim.run.recipe_job import RunJob
from megatron_slim.runtime.outputs import Output

HELP = "run a recipe (stages of importance/plan/prune/distill/evaluate, export, report); idempotent, resumable"


OUTPUTS = (Output("workdir", "workdir", inputs=("recipe",), overwrite=None),)

def add_arguments(p: argparse.ArgumentParser) -> None:
    add_job_arguments(p, RunJob)  # each flag's name, default and help: RunJob's fields


def run(args: argparse.Namespace) -> int:
    from megatron_slim.run.recipe_job import run_recipe

    return run_recipe(job_from_args(RunJob, args))
