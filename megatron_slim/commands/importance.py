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
import os
import sys
from pathlib import Path

HELP = "collect importance statistics (experts, neurons, heads, layers, channels) over calibration data"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="Megatron checkpoint directory (model_config.json) or HF checkpoint directory")
    p.add_argument("--data", required=True,
                   help="calibration data: .jsonl with {'text': ...} or {'tokens': [ids]} per line, or a Megatron "
                        "indexed dataset prefix (.bin/.idx)")
    p.add_argument("--tokens", type=int, required=True,
                   help="calibration tokens (rounded up to whole steps of DP ranks x micro-batch x seq-len)")
    p.add_argument("--out", required=True, help="output importance file (.safetensors)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
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
    p.set_defaults(converted=None)  # set by `run` when it converted an HF --model before spawning the ranks


def _checkpoint_kind(model: Path) -> str:
    from megatron_slim.checkpoint.mcore import MODEL_CONFIG
    from megatron_slim.errors import UserError

    if (model / MODEL_CONFIG).is_file():
        return "mcore"
    if (model / "config.json").is_file():
        return "hf"
    raise UserError(f"{model} is neither a Megatron checkpoint ({MODEL_CONFIG}) nor an HF checkpoint (config.json)")


def _temp_checkpoint(out: Path) -> Path:
    return out.with_name(out.name + ".mcore-tmp")


# What makes a process part of the launched job; the conversion must not see these (see `_convert_in_child`).
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_PORT",
                "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


def _convert_in_child(hf_dir: Path, out_dir: Path, progress: bool) -> None:
    """hf_to_mcore builds a meta model under its own one-process group, which cannot happen inside a running
    multi-rank job: under torchrun/srun rank 0 converts in a child process that does not see the job's ranks."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    cmd = [sys.executable, "-m", "megatron_slim.cli", "convert", "hf-to-mcore", "--hf", str(hf_dir), "--out",
           str(out_dir), "--overwrite", *([] if progress else ["--no-progress"])]
    subprocess.run(cmd, env=env, check=True)


def worker(args: argparse.Namespace) -> None:
    import shutil

    import torch
    import torch.distributed as dist

    from megatron_slim.checkpoint.convert import TOKENIZER_DIR
    from megatron_slim.checkpoint.mcore import load_model, load_model_config
    from megatron_slim.compress.importance import CollectOptions, collect, sequence_count
    from megatron_slim.data.calibration import calibration_windows, eos_token_id
    from megatron_slim.errors import UserError
    from megatron_slim.models.builder import BuildOptions, build_model
    from megatron_slim.runtime.distributed import ParallelConfig, init_model_parallel

    parallel = ParallelConfig(tp=args.tp, ep=args.ep, pp=args.pp)
    init_model_parallel(parallel)
    rank = dist.get_rank()
    model_dir, out = Path(args.model), Path(args.out)
    if args.converted is not None:
        ckpt, tokenizer_dir = Path(args.converted), model_dir
    elif _checkpoint_kind(model_dir) == "hf":
        ckpt, tokenizer_dir = _temp_checkpoint(out), model_dir
        if rank == 0:
            _convert_in_child(model_dir, ckpt, progress=not args.no_progress)
        dist.barrier()
    else:
        ckpt, tokenizer_dir = model_dir, model_dir / TOKENIZER_DIR
    cfg = load_model_config(ckpt)
    tokenizer_dir = tokenizer_dir if tokenizer_dir.is_dir() else None

    group = parallel.dp(dist.get_world_size()) * args.micro_batch
    wanted = sequence_count(args.tokens, args.seq_len, group, args.max_tokens)
    windows = calibration_windows(args.data, args.seq_len, wanted, eos_token_id(cfg.hf_config, tokenizer_dir),
                                  tokenizer_dir)
    usable = len(windows) - len(windows) % group
    if usable == 0:
        raise UserError(f"{args.data} holds {len(windows)} windows of {args.seq_len} tokens; one step needs {group}")
    if usable < wanted and rank == 0:
        print(f"warning: {args.data} runs out after {usable * args.seq_len} tokens (of {wanted * args.seq_len})",
              file=sys.stderr)

    opts = BuildOptions(params_dtype=getattr(torch, args.dtype), perform_initialization=False)  # loaded next
    model = build_model(cfg, parallel, opts)
    load_model(model, ckpt)
    if ckpt != model_dir:
        dist.barrier()  # every rank has loaded the temporary conversion
        if rank == 0:
            shutil.rmtree(ckpt)
    result = collect(model, cfg, windows[:usable],
                     CollectOptions(micro_batch=args.micro_batch, layer_loss=args.layer_loss,
                                    progress=not args.no_progress))
    if result is not None:
        result.data = str(args.data)
        result.options |= {"tp": args.tp, "ep": args.ep, "pp": args.pp, "world": dist.get_world_size(),
                           "dtype": args.dtype}
        result.save(out)
        print(f"wrote {out}: {result.tokens} tokens ({usable} x {args.seq_len}), LM loss "
              f"{result.options['lm_loss']:.4f}, {len(result.tensors)} tensors", flush=True)


def _spawned_worker(args: argparse.Namespace) -> None:
    """A local rank: input errors end the rank with status 2 and one line, as in a single-process run."""
    from megatron_slim.errors import UserError

    try:
        worker(args)
    except (UserError, FileNotFoundError) as e:
        if os.environ.get("RANK") == "0":
            print(f"megatron-slim importance: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2)


def run(args: argparse.Namespace) -> int:
    import shutil

    from megatron_slim.checkpoint.convert import hf_to_mcore
    from megatron_slim.checkpoint.mcore import load_model_config
    from megatron_slim.data.calibration import check_source
    from megatron_slim.errors import UserError
    from megatron_slim.models.builder import validate_layout
    from megatron_slim.models.config import load_hf_config
    from megatron_slim.models.registry import model_config_from_hf
    from megatron_slim.runtime.distributed import ParallelConfig
    from megatron_slim.runtime.spawn import launched_world_size, run_local_world

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists (use --overwrite to replace it)")
    for flag in ("tokens", "tp", "ep", "pp", "micro_batch"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.seq_len < 2:
        raise UserError("--seq-len must be >= 2")
    check_source(args.data)
    model = Path(args.model)
    is_mcore = _checkpoint_kind(model) == "mcore"
    cfg = load_model_config(model) if is_mcore else model_config_from_hf(load_hf_config(model))
    parallel = ParallelConfig(tp=args.tp, ep=args.ep, pp=args.pp)
    try:
        validate_layout(cfg, parallel)
    except ValueError as e:
        raise UserError(str(e)) from e

    launched = launched_world_size() is not None
    if not launched and not is_mcore:  # convert before any process group exists (cf. `_convert_in_child`)
        hf_to_mcore(model, _temp_checkpoint(out), overwrite=True, progress=not args.no_progress)
        args.converted = str(_temp_checkpoint(out))
    world = args.tp * args.ep * args.pp  # smallest world with room for tp*pp and ep*expert_tp*pp (expert_tp = tp)
    try:
        if not launched and world > 1:
            return run_local_world(_spawned_worker, world, args)
        worker(args)
    finally:
        if not is_mcore:  # rank 0 removes it once every rank has loaded it; this covers runs that failed earlier
            shutil.rmtree(_temp_checkpoint(out), ignore_errors=True)
    return 0
