"""The environment variables that make a process a rank of a launched job (torchrun, srun, `run_local_world`).

A child process that must be a lone process of its own (a conversion, a single-process run step, the megatron-core
layout child) starts without them, whatever launched its parent: it then builds a one-rank process group.
"""
from __future__ import annotations

import os

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "TORCHELASTIC_RUN_ID")


def without_launcher_env() -> dict[str, str]:
    """This process's environment without `LAUNCHER_ENV`: the environment of a lone child process."""
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
