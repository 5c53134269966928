"""Run a command's worker on N local processes when it was not started by torchrun or srun.

Lets `megatron-slim verify --tp 2` work on a workstation: the same worker code runs under torchrun/SLURM (it
then uses the ranks it was given) or, when launched as a plain process, spawns the ranks itself.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch.multiprocessing as mp

from megatron_slim.runtime.quiet import silence_upstream_noise


def launched_world_size() -> int | None:
    """World size set by torchrun or SLURM, or None for a plain process."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if "SLURM_NTASKS" in os.environ and "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_NTASKS"])
    return None


def launched_nodes() -> int:
    """How many nodes the launched job's ranks span (1 for a plain or single-node process): torchrun's agent count
    (GROUP_WORLD_SIZE, else WORLD_SIZE / LOCAL_WORLD_SIZE), else the srun step's node count."""
    env = os.environ
    if "WORLD_SIZE" in env:
        if env.get("GROUP_WORLD_SIZE", "").isdigit():
            return int(env["GROUP_WORLD_SIZE"])
        local = int(env.get("LOCAL_WORLD_SIZE") or env["WORLD_SIZE"])
        return -(-int(env["WORLD_SIZE"]) // max(local, 1))
    if "SLURM_PROCID" in env:
        return int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    return 1


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    silence_upstream_noise()
    code = fn(*args)
    if code:
        raise SystemExit(code)


def run_local_world(fn: Callable[..., Any], world: int, *args: Any) -> int:
    """Call fn(*args) on `world` spawned local ranks (fn must be importable at module level).

    Returns the command's exit status: 0, or that of a rank which ended with a non-zero status (a non-zero int
    returned by fn, or SystemExit). An exception in a rank propagates with its traceback.
    """
    from megatron_slim.runtime.distributed import free_port

    try:
        mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)
    except mp.ProcessExitedException as e:
        return e.exit_code
    return 0


def run_on_world(fn: Callable[..., Any], world: int, *args: Any) -> int:
    """fn(*args) here when launched by torchrun/srun (this process is one of the ranks) or when `world` is 1, else
    on `world` spawned local ranks; the exit status as `run_local_world` gives it (None from fn counts as 0)."""
    if launched_world_size() is None and world > 1:
        return run_local_world(fn, world, *args)
    return int(fn(*args) or 0)
