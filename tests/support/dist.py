"""Run a function on several gloo CPU processes, as tensor-parallel ranks, and collect what each rank returns.

`fn` must be importable by a fresh interpreter (a module-level function) because workers are spawned, not forked:
forking a process that already ran torch ops is unsafe. Results travel through torch.save files, so return
tensors, numbers, strings and lists/dicts of them (they are loaded with weights_only=True).
"""
from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it), for the gloo rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0) -> list[Any]:
    """Spawn `world_size` gloo ranks, run fn(rank, world_size, *args) on each, return results ordered by rank.

    A worker's exception fails the caller (torch.multiprocessing re-raises it, with its traceback, and stops the
    other workers), so a rank blocked in a collective cannot hang the test.
    """
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="dist_results_") as out_dir:
        mp.spawn(_worker, args=(world_size, port, out_dir, timeout_s, fn, args), nprocs=world_size, join=True)
        return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]


def _worker(rank: int, world_size: int, port: int, out_dir: str, timeout_s: float,
            fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
