"""Run an HF checkpoint (transformers) and its Megatron-Core conversion on the same tokens and compare logits.

Prints max/mean |logit difference| and top-1 agreement for the main head and each MTP depth. Run it after every
conversion. Under torchrun/srun it uses the ranks it is given for the layout; as a plain process it spawns
tp*pp (times what EP needs) local ranks itself.
"""
from __future__ import annotations

import argparse
import json
import math

from megatron_slim.commands.options import add_layout_arguments

HELP = "compare HF and Megatron-Core logits on the same tokens (max/mean diff, top-1 agreement)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf", required=True, help="HF checkpoint directory (safetensors + config.json)")
    p.add_argument("--mcore", required=True, help="Megatron-Core checkpoint directory (from `convert hf-to-mcore`)")
    add_layout_arguments(p, tp_help="tensor-parallel size for the Megatron side")
    p.add_argument("--batch", type=int, default=2, help="sequences to compare")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    p.add_argument("--max-abs-diff", type=float, default=None,
                   help="exit with status 1 when the main head's max |diff| exceeds this")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from megatron_slim.checkpoint.mcore import load_model_config
    from megatron_slim.runtime.distributed import ParallelConfig
    from megatron_slim.verify.parity import hf_parity, megatron_logits, sample_tokens

    parallel = ParallelConfig(tp=args.tp, ep=args.ep, pp=args.pp)
    tokens = sample_tokens(load_model_config(args.mcore).vocab_size, args.batch, args.seq_len, args.seed)
    _, logits, mtp = megatron_logits(args.mcore, tokens, parallel)
    failed = 0
    if logits is not None:
        report = hf_parity(args.hf, tokens, logits, mtp)
        report["layout"] = {"tp": args.tp, "ep": args.ep, "pp": args.pp, "world": dist.get_world_size()}
        if args.json:
            print(json.dumps(report), flush=True)
        else:
            for head, m in report.items():
                if head != "layout":
                    print(f"{head:>5}: max |diff| {m['max_abs_diff']:.3e}  mean |diff| {m['mean_abs_diff']:.3e}  "
                          f"top-1 agreement {m['top1_agreement'] * 100:.2f}%", flush=True)
        failed = int(args.max_abs_diff is not None and report["main"]["max_abs_diff"] > args.max_abs_diff)
    flag = __import__("torch").tensor([failed])
    dist.all_reduce(flag)
    if flag.item():
        raise SystemExit(1)


def run(args: argparse.Namespace) -> int:
    from megatron_slim.runtime.spawn import run_on_world

    return run_on_world(worker, math.lcm(args.tp, args.ep) * args.pp, args)  # a rank exits 1 on a parity failure
