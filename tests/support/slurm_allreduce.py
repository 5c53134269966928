"""Stand-in distributed program for launch.sh tests: gloo init from the launcher's env, all_reduce of the ranks.

Rank/world come from torchrun's RANK/WORLD_SIZE/LOCAL_RANK, or from srun's SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID
(the mapping megatron-slim's own launcher code does); MASTER_ADDR/MASTER_PORT come from launch.sh or torchrun.
Prints one line per rank: `rank=R world=W local_rank=L sum=S`.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def env_int(*names: str) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    raise KeyError(f"none of {names} set")


def main() -> None:
    rank = env_int("RANK", "SLURM_PROCID")
    world = env_int("WORLD_SIZE", "SLURM_NTASKS")
    local_rank = env_int("LOCAL_RANK", "SLURM_LOCALID")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    # One write() per line, so that the ranks' lines never interleave on a shared pipe.
    os.write(1, f"rank={rank} world={world} local_rank={local_rank} sum={int(total.item())}\n".encode())
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
