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
from pathlib import Path

from megatron_slim.commands.options import add_layout_arguments, add_model_data_arguments
from megatron_slim.engines.importance_job import ImportanceJob, run_importance
from megatron_slim.runtime.layout import ParallelLayout

HELP = "collect importance statistics (experts, neurons, heads, layers, channels) over calibration data"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_data_arguments(p, "calibration",
                             "calibration tokens (rounded up to whole steps of DP ranks x micro-batch x seq-len)")
    p.add_argument("--out", required=True, help="output importance file (.safetensors)")
    add_layout_arguments(p)
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per calibration window")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per forward micro-batch")
    p.add_argument("--layer-loss", action="store_true",
                   help="also measure each decoder layer's LM-loss increase when skipped (one extra forward per "
                        "layer and batch)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="hard budget: never run more calibration tokens than this (rounds --tokens down instead of up)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="model parameter dtype (statistics are accumulated in float64 either way)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def job(args: argparse.Namespace) -> ImportanceJob:
    """The parsed flags as the library's job."""
    return ImportanceJob(model=args.model, data=args.data, tokens=args.tokens, out=Path(args.out),
                         parallel=ParallelLayout(tp=args.tp, ep=args.ep, pp=args.pp), seq_len=args.seq_len,
                         micro_batch=args.micro_batch,
                         layer_loss=args.layer_loss, max_tokens=args.max_tokens, dtype=args.dtype,
                         overwrite=args.overwrite, progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    return run_importance(job(args))
