"""Train a student on Megatron-Core, with an online teacher (distillation) or without (plain/continued training).

Everything is in the run config (YAML; see examples/). Under torchrun/srun it uses the ranks it is given; as a
plain process it spawns --nproc local ranks. Exit status 75 means "checkpointed on SIGTERM/SIGUSR1, requeue me"
(launch.sh requeues the SLURM job); rerunning the same command resumes from the newest complete checkpoint.
"""
from __future__ import annotations

import argparse

HELP = "train / distill a student from a run config (resumable, preemption-safe)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run config YAML (model, teacher, data, parallel, batch, ...)")
    p.add_argument("--nproc", type=int, default=1, help="local ranks to spawn when not launched by torchrun/srun")


def worker(config_path: str) -> int:
    from megatron_slim.train.config import load_run_config
    from megatron_slim.train.trainer import Trainer

    trainer = Trainer(load_run_config(config_path))
    trainer.setup()
    return trainer.train()


def run(args: argparse.Namespace) -> int:
    from megatron_slim.runtime.spawn import launched_world_size, run_local_world
    from megatron_slim.train.config import load_run_config

    load_run_config(args.config).validate()  # report config errors before any process starts
    if launched_world_size() is None and args.nproc > 1:
        return run_local_world(worker, args.nproc, args.config)
    return worker(args.config)
