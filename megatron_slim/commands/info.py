"""Print versions, detected devices and optional-kernel availability (Transformer Engine, apex, fla).

With --distributed, initialise torch.distributed from the launcher's environment (torchrun or SLURM) and
check every rank can reach every other with an all-reduce: a cheap first job on a new cluster.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform

from megatron_slim.runtime import json_out
from megatron_slim.runtime.outputs import Output

HELP = "versions, devices, TE/apex availability; --distributed checks the launcher's process group"
_PACKAGES = ["torch", "megatron-core", "transformers", "flash-linear-attention", "transformer-engine", "apex",
             "safetensors", "numpy"]


OUTPUTS: tuple[Output, ...] = ()  # prints only

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--distributed", action="store_true",
                   help="initialise torch.distributed from torchrun/SLURM env and all-reduce across all ranks")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict:
    import torch

    from megatron_slim import __version__
    from megatron_slim.models.specs import have_transformer_engine

    try:
        import apex  # noqa: F401
        have_apex = True
    except ImportError:
        have_apex = False
    cuda = torch.cuda.is_available()
    capability = torch.cuda.get_device_capability() if cuda else None
    te = have_transformer_engine()
    return {
        "megatron_slim": __version__,
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "cpus": os.cpu_count(),
        "cuda_available": cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "gpu_compute_capability": ".".join(map(str, capability)) if capability else None,
        "transformer_engine": te,
        "apex": have_apex,
        # FP8 needs TE and Ada/Hopper or newer (compute capability 8.9); MXFP8 needs Blackwell (10.0)
        "fp8_capable": bool(te and capability and capability >= (8, 9)),
        "mxfp8_capable": bool(te and capability and capability >= (10, 0)),
        "backend": "transformer_engine" if cuda and te else "local (torch-native)",
    }


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.distributed:
        import torch
        import torch.distributed as dist

        from megatron_slim.runtime.distributed import init_distributed

        denv = init_distributed()
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        t = torch.tensor([float(denv.rank)], device=device)
        dist.all_reduce(t)
        info["distributed"] = {"rank": denv.rank, "world_size": denv.world_size, "local_rank": denv.local_rank,
                               "master": f"{denv.master_addr}:{denv.master_port}", "backend": dist.get_backend(),
                               "rank_sum": int(t.item()),
                               "expected_rank_sum": denv.world_size * (denv.world_size - 1) // 2}
        dist.destroy_process_group()
    if args.json:
        json_out.emit(info)
        return 0
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v if v is not None else 'not installed'}")
        else:
            print(f"{key}: {value}")
    return 0
