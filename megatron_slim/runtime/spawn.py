"""Run a command's worker on N local processes when it was not started by torchrun or srun.

Lets `megatron-slim verify --tp 2` work on a workstation: the same worker code runs under torchrun/SLURM (it
then uses the ranks it was given) or, when launched as a plain process, spawns the ranks itself.
"""
from __future__ import annotations

import os
import signal
from typing import Any, Callable

import torch.multiprocessing as mp

from megatron_slim.runtime.lifetime import die_with_parent, install
from megatron_slim.runtime.quiet import silence_upstream_noise

FORWARDED = (signal.SIGTERM, signal.SIGUSR1)  # the preemption signals (`runtime.preemption`)


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


def _entry(rank: int, world: int, port: int, parent: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    die_with_parent(parent)  # a rank never computes on after the command that spawned it was killed
    install()  # nor do the processes it forks (checkpoint writers)
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

    SIGTERM/SIGUSR1 sent to this process (a scheduler's preemption, `kill`) are passed on to every rank, which
    checkpoint and end with their status (75 to requeue, `runtime.preemption`), and this process waits for them
    and returns it: it does not exit at once leaving its ranks orphaned. If it is killed outright the ranks die
    with it (`runtime.lifetime`).
    """
    from megatron_slim.runtime.distributed import free_port

    context = mp.start_processes(_entry, args=(world, free_port(), os.getpid(), fn, args), nprocs=world, join=False,
                                 start_method="spawn")

    def forward(signum: int, frame: object) -> None:
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        while not context.join(grace_period=60):  # the other ranks may still be finishing a checkpoint
            pass
    except mp.ProcessExitedException as e:
        return e.exit_code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def run_on_world(fn: Callable[..., Any], world: int, *args: Any) -> int:
    """fn(*args) here when launched by torchrun/srun (this process is one of the ranks) or when `world` is 1, else
    on `world` spawned local ranks; the exit status as `run_local_world` gives it (None from fn counts as 0)."""
    if launched_world_size() is None and world > 1:
        return run_local_world(fn, world, *args)
    return int(fn(*args) or 0)
