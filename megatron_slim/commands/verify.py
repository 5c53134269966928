"""Run an HF checkpoint (transformers) and its Megatron-Core conversion on the same tokens and compare logits.

Prints max/mean |logit difference| and top-1 agreement for the main head and each MTP depth, and exits with
status 1 when a head misses the thresholds (--min-top1, --max-abs-diff): run it after every conversion. Under
torchrun/srun it uses the ranks it is given for the layout; as a plain process it spawns tp*pp (times what EP
needs) local ranks itself.
"""
from __future__ import annotations

import argparse

from megatron_slim.commands.options import add_layout_arguments, add_nonfinite_argument
from megatron_slim.runtime.layout import ParallelLayout
from megatron_slim.runtime.outputs import Output
from megatron_slim.verify.parity import Thresholds
from megatron_slim.verify.verify_job import VerifyJob, run_verify

HELP = "compare HF and Megatron-Core logits on the same tokens (max/mean diff, top-1 agreement)"


OUTPUTS: tuple[Output, ...] = ()  # prints only

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf", required=True, help="HF checkpoint directory (safetensors + config.json)")
    p.add_argument("--mcore", required=True, help="Megatron-Core checkpoint directory (from `convert hf-to-mcore`)")
    add_layout_arguments(p, tp_help="tensor-parallel size for the Megatron side")
    p.add_argument("--batch", type=int, default=2, help="sequences to compare")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    p.add_argument("--min-top1", type=float, default=Thresholds.min_top1_agreement,
                   help="exit with status 1 when any head's top-1 agreement is below this fraction (0 disables)")
    p.add_argument("--max-abs-diff", type=float, default=None,
                   help="exit with status 1 when the main head's max |diff| exceeds this")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_nonfinite_argument(p)


def job(args: argparse.Namespace) -> VerifyJob:
    """The parsed flags as the library's job."""
    return VerifyJob(hf=args.hf, mcore=args.mcore, parallel=ParallelLayout(tp=args.tp, ep=args.ep, pp=args.pp),
                     batch=args.batch, seq_len=args.seq_len, seed=args.seed, json=args.json,
                     allow_nonfinite=args.allow_nonfinite,
                     limits=Thresholds(min_top1_agreement=args.min_top1, max_abs_diff=args.max_abs_diff))


def run(args: argparse.Namespace) -> int:
    return run_verify(job(args))
