"""Evaluate a model on held-out data: LM loss, perplexity, next-token accuracy and MTP speculative acceptance.

Windows of --seq-len tokens are cut from --data exactly as for `importance` (data/calibration.py): the first
ceil(--tokens / --seq-len) windows, whatever the layout, so a teacher and its students evaluated on the same data
see identical tokens. MTP acceptance (models with MTP layers) uses the first --mtp-prompts windows cut to
--prompt-len tokens as prompts and the model's own --gen-tokens-token greedy continuation; see
megatron_slim/eval/metrics.py for the exact definition.

--model is a Megatron checkpoint (model_config.json: a converted/pruned model or a training checkpoint's
iter_XXXXXXX directory) or an HF directory, converted first into a temporary Megatron checkpoint next to --out
(or in the working directory) that is removed afterwards. Under torchrun/srun the given ranks are used; as a plain
process it spawns tp*ep*pp local ranks. Prints a small table, or with --json one JSON object with the keys
tokens, loss, ppl, accuracy, mtp_acceptance {k: rate}, mean_accepted, mtp_positions (plus data and layout);
--out writes that object to a file (replacing it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

HELP = "evaluate LM loss, perplexity, accuracy and MTP speculative acceptance on held-out data"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="Megatron checkpoint directory (model_config.json) or HF checkpoint directory")
    p.add_argument("--data", required=True,
                   help="evaluation data: .jsonl with {'text': ...} or {'tokens': [ids]} per line, or a Megatron "
                        "indexed dataset prefix (.bin/.idx)")
    p.add_argument("--tokens", type=int, required=True,
                   help="evaluation tokens (rounded up to whole windows of --seq-len)")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per evaluation window")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per forward micro-batch")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--mtp-k", type=int, default=4, help="MTP drafts per speculative step (0: no MTP acceptance)")
    p.add_argument("--mtp-prompts", type=int, default=8, help="prompts for MTP acceptance")
    p.add_argument("--prompt-len", type=int, default=256, help="prompt tokens (at most --seq-len)")
    p.add_argument("--gen-tokens", type=int, default=32,
                   help="greedy tokens generated per prompt (one full forward each); must exceed --mtp-k")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model parameter dtype")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.set_defaults(converted=None)  # set by `run` when it converted an HF --model before spawning the ranks


def _temp_checkpoint(args: argparse.Namespace) -> Path:
    """Where an HF --model is converted: a name every rank derives alike, on a file system they share."""
    base = Path(args.out) if args.out else Path.cwd() / f"evaluate-{Path(args.model).resolve().name}"
    return base.with_name(base.name + ".mcore-tmp")


def format_table(result: dict) -> str:
    """The human-readable report."""
    lines = [f"tokens     {result['tokens']}", f"loss       {result['loss']:.4f} nats/token",
             f"ppl        {result['ppl']:.3f}", f"accuracy   {result['accuracy'] * 100:.2f}%"]
    if result["mtp_acceptance"]:
        lines.append(f"MTP acceptance over {result['mtp_positions']} drafting positions:")
        lines += [f"  @{k:<8} {rate * 100:.2f}%" for k, rate in result["mtp_acceptance"].items()]
        lines.append(f"  mean accepted drafts per step {result['mean_accepted']:.3f}")
    return "\n".join(lines)


def worker(args: argparse.Namespace) -> None:
    import shutil

    import torch
    import torch.distributed as dist

    from megatron_slim.checkpoint.convert import TOKENIZER_DIR
    from megatron_slim.checkpoint.mcore import load_model, load_model_config
    from megatron_slim.commands.importance import _checkpoint_kind, _convert_in_child
    from megatron_slim.data.calibration import calibration_windows, eos_token_id
    from megatron_slim.errors import UserError
    from megatron_slim.eval.evaluate import evaluate
    from megatron_slim.models.builder import BuildOptions, build_model
    from megatron_slim.runtime.distributed import ParallelConfig, init_model_parallel

    parallel = ParallelConfig(tp=args.tp, ep=args.ep, pp=args.pp)
    init_model_parallel(parallel)
    rank = dist.get_rank()
    model_dir = Path(args.model)
    if args.converted is not None:
        ckpt, tokenizer_dir = Path(args.converted), model_dir
    elif _checkpoint_kind(model_dir) == "hf":
        ckpt, tokenizer_dir = _temp_checkpoint(args), model_dir
        if rank == 0:
            _convert_in_child(model_dir, ckpt, progress=False)
        dist.barrier()
    else:
        ckpt, tokenizer_dir = model_dir, model_dir / TOKENIZER_DIR
    cfg = load_model_config(ckpt)
    tokenizer_dir = tokenizer_dir if tokenizer_dir.is_dir() else None

    wanted = math.ceil(args.tokens / args.seq_len)
    with_mtp = args.mtp_k > 0 and cfg.mtp_num_layers > 0
    windows = calibration_windows(args.data, args.seq_len, max(wanted, args.mtp_prompts if with_mtp else 1),
                                  eos_token_id(cfg.hf_config, tokenizer_dir), tokenizer_dir)
    if len(windows) == 0:
        raise UserError(f"{args.data} holds fewer than {args.seq_len} tokens: not one evaluation window")
    if len(windows) < wanted and rank == 0:
        print(f"warning: {args.data} runs out after {len(windows) * args.seq_len} tokens (of "
              f"{wanted * args.seq_len})", file=sys.stderr)
    prompts = windows[:args.mtp_prompts, :args.prompt_len] if with_mtp else None

    opts = BuildOptions(params_dtype=getattr(torch, args.dtype), perform_initialization=False)  # loaded next
    model = build_model(cfg, parallel, opts)
    load_model(model, ckpt)
    if ckpt != model_dir:
        dist.barrier()  # every rank has loaded the temporary conversion
        if rank == 0:
            shutil.rmtree(ckpt)
    result = evaluate(model, cfg, windows[:wanted], args.micro_batch, mtp_k=args.mtp_k, prompts=prompts,
                      gen_tokens=args.gen_tokens)
    if rank != 0:
        return
    report = result | {"data": str(args.data), "model": str(args.model), "seq_len": args.seq_len,
                       "layout": {"tp": args.tp, "ep": args.ep, "pp": args.pp, "world": dist.get_world_size()}}
    text = json.dumps(report)
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, out)
    print(text if args.json else format_table(result), flush=True)


def _spawned_worker(args: argparse.Namespace) -> None:
    """A local rank: input errors end the rank with status 2 and one line, as in a single-process run."""
    from megatron_slim.errors import UserError

    try:
        worker(args)
    except (UserError, FileNotFoundError) as e:
        if os.environ.get("RANK") == "0":
            print(f"megatron-slim evaluate: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2)


def run(args: argparse.Namespace) -> int:
    import shutil

    from megatron_slim.checkpoint.convert import hf_to_mcore
    from megatron_slim.checkpoint.mcore import load_model_config
    from megatron_slim.commands.importance import _checkpoint_kind
    from megatron_slim.data.calibration import check_source
    from megatron_slim.errors import UserError
    from megatron_slim.models.builder import validate_layout
    from megatron_slim.models.config import load_hf_config
    from megatron_slim.models.registry import model_config_from_hf
    from megatron_slim.runtime.distributed import ParallelConfig
    from megatron_slim.runtime.spawn import launched_world_size, run_local_world

    for flag in ("tokens", "tp", "ep", "pp", "micro_batch", "mtp_prompts", "prompt_len"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.seq_len < 2:
        raise UserError("--seq-len must be >= 2")
    if args.mtp_k < 0:
        raise UserError("--mtp-k must be >= 0")
    if args.mtp_k and args.gen_tokens <= args.mtp_k:
        raise UserError(f"--gen-tokens ({args.gen_tokens}) must exceed --mtp-k ({args.mtp_k})")
    args.prompt_len = min(args.prompt_len, args.seq_len)
    check_source(args.data)
    model = Path(args.model)
    is_mcore = _checkpoint_kind(model) == "mcore"
    cfg = load_model_config(model) if is_mcore else model_config_from_hf(load_hf_config(model))
    try:
        validate_layout(cfg, ParallelConfig(tp=args.tp, ep=args.ep, pp=args.pp))
    except ValueError as e:
        raise UserError(str(e)) from e

    launched = launched_world_size() is not None
    temp = _temp_checkpoint(args)
    if not launched and not is_mcore:  # convert before any process group exists (cf. importance._convert_in_child)
        hf_to_mcore(model, temp, overwrite=True, progress=False)
        args.converted = str(temp)
    world = args.tp * args.ep * args.pp  # smallest world with room for tp*pp and ep*expert_tp*pp (expert_tp = tp)
    try:
        if not launched and world > 1:
            return run_local_world(_spawned_worker, world, args)
        worker(args)
    finally:
        if not is_mcore:  # rank 0 removes it once every rank has loaded it; this covers runs that failed earlier
            shutil.rmtree(temp, ignore_errors=True)
    return 0
