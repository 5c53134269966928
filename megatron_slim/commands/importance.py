"""Collect calibration statistics of a model into an importance file (the input of `megatron-slim plan`).

Runs the Megatron-Core model at the requested TP/PP/EP layout (remaining ranks are data-parallel and split the
data) over calibration windows and records, per decoder layer and MTP depth: expert frequency, soft router
probabilities, REAP, coactivation, router cosine, expert/shared/dense neuron activations, attention head and
query-group norms, Gated DeltaNet head norms, block influence and optionally the LM-loss increase when the layer is
skipped; and model-wide hidden-channel magnitudes. See megatron_slim/compress/importance_file.py for definitions.

--model is a Megatron checkpoint (with model_config.json) or an HF directory, converted first into
`<out>.mcore-tmp` (removed afterwards; its directory must be visible to every rank). Under torchrun/srun the given
ranks are used; as a plain process it spawns tp*ep*pp local ranks itself.
"""
from __future__ import annotations

import argparse

from megatron_slim.commands.options import add_job_arguments, job_from_args
from megatron_slim.engines.importance_job import ImportanceJob, run_importance
from megatron_slim.runtime.outputs import Output

HELP = "collect importance statistics (experts, neurons, heads, layers, channels) over calibration data"


OUTPUTS = (Output("out", "file", inputs=("model", "data")),)

def add_arguments(p: argparse.ArgumentParser) -> None:
    add_job_arguments(p, ImportanceJob)  # each flag's name, default and help: ImportanceJob's fields


def job(args: argparse.Namespace) -> ImportanceJob:
    """The parsed flags as the library's job."""
    return job_from_args(ImportanceJob, args)


def run(args: argparse.Namespace) -> int:
    return run_importance(job(args))
