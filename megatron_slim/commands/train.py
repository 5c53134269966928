"""Train a student on Megatron-Core, with an online teacher (distillation) or without (plain/continued training).

Everything is in the run config (YAML; see examples/). Under torchrun/srun it uses the ranks it is given; as a
plain process it spawns --nproc local ranks. Exit status 75 means "checkpointed on SIGTERM/SIGUSR1, requeue me"
(launch.sh requeues the SLURM job); rerunning the same command resumes from the newest complete checkpoint.
"""
from __future__ import annotations

import argparse

from megatron_slim.runtime.outputs import Output

HELP = "train / distill a student from a run config (resumable, preemption-safe)"


OUTPUTS = (Output("config", "workdir", overwrite=None, paths=lambda args: train_paths(args.config)),)

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run config YAML (model, teacher, data, parallel, batch, ...)")
    p.add_argument("--nproc", type=int, default=1, help="local ranks to spawn when not launched by torchrun/srun")


def train_paths(config_path: str) -> tuple[str | None, list[str]]:
    """(the save dir, what the run reads: the config, the student's and teacher's checkpoints, the data) of a run
    config; the save dir is None when the config does not load (`run` reports that, fully)."""
    from megatron_slim.errors import UserError
    from megatron_slim.train.config import load_run_config

    try:
        cfg = load_run_config(config_path)
    except (UserError, OSError, ValueError):
        return None, []
    inputs = [config_path, cfg.model.checkpoint, *(e[1] for e in cfg.data.blend if isinstance(e, list) and len(e) == 2)]
    if cfg.teacher is not None:
        inputs.append(cfg.teacher.checkpoint)
    return cfg.checkpoint.save_dir or None, [str(i) for i in inputs if i]


def worker(config_path: str) -> int:
    from megatron_slim.train.config import load_run_config
    from megatron_slim.train.trainer import Trainer

    trainer = Trainer(load_run_config(config_path))
    trainer.setup()
    return trainer.train()


def run(args: argparse.Namespace) -> int:
    from megatron_slim.runtime.outputs import prepare_workdir, workdir_lock
    from megatron_slim.runtime.spawn import launched_world_size, run_local_world
    from megatron_slim.train.config import load_run_config

    cfg = load_run_config(args.config)
    cfg.validate()  # report config errors before any process starts
    if launched_world_size() is not None:  # one of the ranks (every rank writes its shards of the save dir)
        return worker(args.config)
    # a plain process: it runs the only rank or spawns them, and holds the save dir (one trainer per save dir)
    save_dir = prepare_workdir(cfg.checkpoint.save_dir, owner="train", inputs=train_paths(args.config)[1])
    with workdir_lock(save_dir):
        if args.nproc > 1:
            return run_local_world(worker, args.nproc, args.config)
        return worker(args.config)
