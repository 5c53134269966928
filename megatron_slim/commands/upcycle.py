"""Upcycle a dense Llama-style HF checkpoint into a Mixtral MoE checkpoint by splitting every FFN into experts.

Each layer's FFN neurons are split into equal experts and a router is fitted on calibration inputs to that FFN
(captured from the dense model on the demo's Wikipedia calibration paragraphs); see
`megatron_slim.compress.upcycle_ffn` for the construction. Attention, norms and embeddings are copied unchanged. At
`--topk` equal to `--experts` the MoE reproduces the dense model up to O(--router-scale) (exactly at 0); below it,
each token skips the neuron groups its router predicts matter least. Expert outputs carry a factor of `--topk`: to
change top-k later, multiply the experts' w2 by k_new / k_old.
"""
from __future__ import annotations

import argparse

from megatron_slim.commands.options import add_job_arguments, job_from_args
from megatron_slim.engines.upcycle_job import UpcycleJob
from megatron_slim.runtime.outputs import Output

HELP = "turn a dense HF Llama checkpoint (or the embedded SmolLM2) into a Mixtral MoE checkpoint"


OUTPUTS = (Output("out", "dir", inputs=("dense",)),)

def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(parser, UpcycleJob)  # each flag's name, default and help: UpcycleJob's fields


def run(args: argparse.Namespace) -> int:
    from megatron_slim.engines.upcycle_job import run_upcycle

    run_upcycle(job_from_args(UpcycleJob, args))
    return 0
