"""Apply a compression plan (from `megatron-slim plan`) to a checkpoint: drop layers, hidden channels, query groups,
GDN heads and FFN neurons, and keep or merge experts, writing a student checkpoint whose config is plan.target.

The input is an HF checkpoint directory or a Megatron-Core checkpoint from `convert hf-to-mcore`; the output is
either format. Streams one layer at a time (memory: about one layer's weights) and writes `<out>.partial` first,
renaming it only when complete. Run `megatron-slim verify` on the result to check HF/Megatron parity.
The plan must have been computed on --in's weights: its source fingerprint (recorded by `importance`) is compared
with --in's, and another model of the same shapes is refused unless --allow-other-model.
"""
from __future__ import annotations

import argparse

from megatron_slim.runtime.outputs import Output

HELP = "apply a compression plan to a checkpoint (prune/merge; streamed, HF or Megatron in and out)"


OUTPUTS = (Output("out", "dir", inputs=("input", "plan")),)

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", required=True, help="compression plan JSON (from `megatron-slim plan`)")
    p.add_argument("--in", dest="input", required=True,
                   help="source checkpoint: HF directory (config.json) or Megatron-Core directory (model_config.json)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--out-format", choices=("hf", "mcore"), default="hf", help="format of the output checkpoint")
    p.add_argument("--align-neurons", action="store_true",
                   help="before averaging merged experts, permute each one's FFN neurons to best match the base's")
    p.add_argument("--no-norm-rescale", action="store_true",
                   help="keep RMSNorm gains as they are when hidden channels are pruned (default: scale them by "
                        "sqrt(H/H'), which keeps the norm outputs' scale; see compress/surgery.py)")
    p.add_argument("--allow-other-model", action="store_true",
                   help="apply a plan whose importance was collected on other weights than --in's (same config; "
                        "e.g. a base model's plan on its fine-tune); refused by default")
    p.add_argument("--dry-run", action="store_true", help="check the plan and print what would be written")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from megatron_slim.compress.plan import CompressionPlan
    from megatron_slim.compress.prune_checkpoint import Options, prune_checkpoint

    plan = CompressionPlan.load(args.plan)
    opts = Options(align_neurons=args.align_neurons, rescale_norms=not args.no_norm_rescale)
    summary = prune_checkpoint(plan, args.input, args.out, args.out_format, opts=opts, overwrite=args.overwrite,
                               dry_run=args.dry_run, progress=not args.no_progress,
                               allow_other_model=args.allow_other_model)
    print(("would write " if args.dry_run else f"wrote {args.out}: ") + summary.describe())
    return 0
