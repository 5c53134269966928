"""Run a command's worker on N local processes when it was not started by torchrun or srun.

Lets `megatron-slim verify --tp 2` work on a workstation: the same worker code runs under torchrun/SLURM (it
then uses the ranks it was given) or, when launched as a plain process, spawns the ranks itself.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch.multiprocessing as mp


def launched_world_size() -> int | None:
    """World size set by torchrun or SLURM, or None for a plain process."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if "SLURM_NTASKS" in os.environ and "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_NTASKS"])
    return None


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    fn(*args)


def run_local_world(fn: Callable[..., Any], world: int, *args: Any) -> None:
    """Call fn(*args) on `world` spawned local ranks (fn must be importable at module level)."""
    from megatron_slim.runtime.distributed import _free_port

    mp.spawn(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True)
