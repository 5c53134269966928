"""torch.distributed and Megatron-Core parallel state, from torchrun's or SLURM's environment.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Under `srun` (launch.sh) we map SLURM's
variables instead: SLURM_PROCID -> rank, SLURM_NTASKS -> world size, SLURM_LOCALID -> local rank, and the first
host of SLURM_JOB_NODELIST -> MASTER_ADDR. A plain `python` run is a world of one.
"""
from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_slim.runtime.layout import ParallelLayout
from megatron_slim.runtime.seed import DEFAULT_SEED


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        # "node[01-04,07]" -> "node01"; "a,b" -> "a"
        head = nodelist.split(",")[0]
        if "[" in head:
            prefix, rng = head.split("[", 1)
            return prefix + rng.split("-")[0].split(",")[0].rstrip("]")
        return head


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_env() -> DistEnv:
    """Read rank/world/master from torchrun's env, else SLURM's, else a single local process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        port = int(env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), addr, port)
    return DistEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT") or free_port()))


def local_device() -> torch.device:
    """This rank's device: its GPU (set by `init_distributed`) or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def world_reduce(value: int, op: dist.ReduceOp = dist.ReduceOp.MAX) -> int:
    """`value` reduced over every rank of the job (collective): how ranks agree on widths and step counts."""
    t = torch.tensor([value], dtype=torch.long, device=local_device())
    dist.all_reduce(t, op=op)
    return int(t.item())


def init_distributed(timeout_minutes: int = 30) -> DistEnv:
    """Initialise torch.distributed (NCCL on GPU, gloo on CPU); idempotent."""
    denv = detect_env()
    if dist.is_initialized():
        return denv
    if torch.cuda.is_available():
        torch.cuda.set_device(denv.local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{denv.master_addr}:{denv.master_port}",
        rank=denv.rank,
        world_size=denv.world_size,
        timeout=timedelta(minutes=timeout_minutes),
    )
    return denv


def init_model_parallel(parallel: ParallelLayout, seed: int = DEFAULT_SEED) -> None:
    """Create Megatron-Core's process groups for `parallel` and seed its RNG tracker."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not torch.cuda.is_available():
        from megatron_slim.runtime import cpu_compat

        cpu_compat.activate()
    init_distributed()
    parallel.validate_world(dist.get_world_size())
    release_model_parallel()
    before = _registered_groups()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.expert_tp,
    )
    _MEGATRON_GROUPS.extend(g for g in _registered_groups() if g not in before)
    model_parallel_cuda_manual_seed(seed)


# The process groups `initialize_model_parallel` created, so that `release_model_parallel` can destroy them.
_MEGATRON_GROUPS: list[dist.ProcessGroup] = []


def _registered_groups() -> list[dist.ProcessGroup]:
    """Every process group torch.distributed knows (its registry is private; no public listing exists)."""
    return list(dist.distributed_c10d._world.pg_map)


def release_model_parallel() -> None:
    """Collective: end Megatron-Core's parallel state and destroy its process groups. megatron-core's
    `destroy_model_parallel` only forgets most groups, which stay registered with their communicators (gloo:
    two polling threads each): a process that re-initialises per step, as the CPU demo does, accumulated
    600 threads, whose wake-ups cost ~10% of its CPU."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    alive = set(_registered_groups())
    for group in _MEGATRON_GROUPS:
        if group in alive:
            dist.destroy_process_group(group)
    _MEGATRON_GROUPS.clear()
