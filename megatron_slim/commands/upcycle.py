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
from pathlib import Path

from megatron_slim.engines.upcycle_job import EMBEDDED_DENSE
from megatron_slim.runtime.outputs import Output

HELP = "turn a dense HF Llama checkpoint (or the embedded SmolLM2) into a Mixtral MoE checkpoint"


OUTPUTS = (Output("out", "dir", inputs=("dense",)),)

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dense", required=True,
                        help=f"dense HF checkpoint dir, or '{EMBEDDED_DENSE}' for the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--experts", type=int, required=True, help="experts per layer (must divide the FFN size)")
    parser.add_argument("--topk", type=int, required=True, help="experts per token")
    parser.add_argument("--out", type=Path, required=True, help="output HF checkpoint dir")
    parser.add_argument("--calib-tokens", type=int, default=16384,
                        help="calibration tokens (Wikipedia calibration paragraphs) for clustering and routers")
    parser.add_argument("--router-scale", type=float, default=1e-3,
                        help="router logit scale: smaller is closer to the dense model at top-k = experts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it is an earlier output of megatron-slim (never another directory)")


def run(args: argparse.Namespace) -> int:
    from megatron_slim.engines.upcycle_job import UpcycleJob, run_upcycle

    run_upcycle(UpcycleJob(dense=args.dense, experts=args.experts, topk=args.topk, out=args.out,
                           calib_tokens=args.calib_tokens, router_scale=args.router_scale, seed=args.seed,
                           overwrite=args.overwrite))
    return 0
