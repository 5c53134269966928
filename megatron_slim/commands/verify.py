"""Run an HF checkpoint (transformers) and its Megatron-Core conversion on the same tokens and compare logits.

Prints max/mean |logit difference| and top-1 agreement for the main head and each MTP depth, and exits with
status 1 when a head misses the thresholds (--min-top1, --max-abs-diff): run it after every conversion. Under
torchrun/srun it uses the ranks it is given for the layout; as a plain process it spawns tp*pp (times what EP
needs) local ranks itself.
"""
from __future__ import annotations

import argparse

from megatron_slim.commands.options import add_job_arguments, job_from_args
from megatron_slim.runtime.outputs import Output
from megatron_slim.verify.verify_job import VerifyJob, run_verify

HELP = "compare HF and Megatron-Core logits on the same tokens (max/mean diff, top-1 agreement)"


OUTPUTS: tuple[Output, ...] = ()  # prints only

def add_arguments(p: argparse.ArgumentParser) -> None:
    add_job_arguments(p, VerifyJob)  # each flag's name, default and help: VerifyJob's fields


def job(args: argparse.Namespace) -> VerifyJob:
    """The parsed flags as the library's job."""
    return job_from_args(VerifyJob, args)


def run(args: argparse.Namespace) -> int:
    return run_verify(job(args))
