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
from pathlib import Path

from megatron_slim.runtime.outputs import Output

HELP = "run a recipe (stages of importance/plan/prune/distill/evaluate, export, report); idempotent, resumable"


OUTPUTS = (Output("workdir", "workdir", inputs=("recipe",), overwrite=None),)

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML (see examples/slimqwen/recipe.yaml and "
                                   "megatron_slim/run/recipe_schema.py)")
    p.add_argument("--workdir", required=True, help="directory for every output and the run's state")
    p.add_argument("--stage", help="run only this stage (earlier stages must be done); with variants VARIANT/STAGE, "
                   "or `shared` for only the steps variants share (what --list-stages prints)")
    p.add_argument("--variant", help="run only this variant of a recipe that declares variants (default: every "
                   "variant in turn; steps they share run once)")
    p.add_argument("--list-stages", action="store_true",
                   help="print the stage names, one per line, and exit (with variants: `shared`, then VARIANT/STAGE)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the recipe and print the steps with their status and each stage's student")
    p.add_argument("--gpu-memory", help="memory of one GPU (e.g. 80GiB; default: the recipe's cluster.gpu_memory): "
                   "a stage whose memory plan does not fit is refused before anything runs")
    p.add_argument("--fresh", action="store_true", help="remove the work dir's contents first and run every step "
                   "again (only a work dir `run` created, holding none of the run's inputs)")
    p.add_argument("--list-jobs", action="store_true",
                   help="print the jobs of a chain that keeps GPUs busy, one NAME:cpu or NAME:gpu per line, and exit "
                   "(what `launch.sh --submit --chain --cpu-partition P` submits)")
    p.add_argument("--job", help="run only this job of --list-jobs (the jobs before it must be done)")
    p.add_argument("--allow-single-process-steps", action="store_true",
                   help="in a job spanning several nodes, run the single-process steps (teacher conversion, "
                   "tokenization, pruning, export) here anyway, while the other GPUs wait (refused by default)")
    p.add_argument("--step", help=argparse.SUPPRESS)  # internal: one single-process step (child of a multi-rank job)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from megatron_slim.run.recipe_job import RunJob, run_recipe

    return run_recipe(RunJob(recipe=Path(args.recipe), workdir=Path(args.workdir), stage=args.stage,
                             variant=args.variant,
                             list_stages=args.list_stages, dry_run=args.dry_run, step=args.step,
                             progress=not args.no_progress, list_jobs=args.list_jobs, job=args.job,
                             allow_single_process_steps=args.allow_single_process_steps, fresh=args.fresh,
                             gpu_memory=args.gpu_memory))
