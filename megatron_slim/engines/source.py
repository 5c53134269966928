"""A job's --model as a Megatron checkpoint, shared by the jobs that load a model on every rank (importance,
evaluate).

The model is a Megatron checkpoint (model_config.json) or an HF directory. An HF model is converted into a
temporary Megatron checkpoint first: by the plain process before it spawns local ranks, or under torchrun/srun by
rank 0 in a child process that does not see the job's ranks, the other ranks waiting at a barrier. The conversion
is removed once every rank has loaded it, and by the launching process whatever happened.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, TypeVar

from megatron_slim.errors import UserError
from megatron_slim.runtime.config_loader import setting
from megatron_slim.runtime.launch_env import without_launcher_env
from megatron_slim.runtime.layout import ParallelLayout
from megatron_slim.runtime.lifetime import child_env
from megatron_slim.runtime.outputs import claim_output_file

DTYPES = ("float32", "bfloat16")
NONFINITE_HELP = "load a model whose weights hold NaN or Inf (refused by default, naming the tensor)"


def data_help(use: str) -> str:
    """The --data help of a job that reads token windows of data for `use`."""
    return (f"{use} data: .jsonl with {{'text': ...}} or {{'tokens': [ids]}} per line, or a Megatron indexed dataset "
            "prefix (.bin/.idx)")


@dataclass(frozen=True, kw_only=True)
class ModelJob:
    """What the jobs that run a model on every rank over token windows of data share (fields named as the
    commands' flags): the model, the data, the window shape and the layout."""

    model: str = setting(help="Megatron checkpoint directory (model_config.json) or HF checkpoint directory")
    data: str  # .jsonl or Megatron indexed dataset prefix (each job declares what for: `data_help`)
    tokens: int
    seq_len: int = 4096
    micro_batch: int = setting(1, help="sequences per forward micro-batch")
    parallel: ParallelLayout = setting(ParallelLayout(), help="model-parallel layout (--tp, --ep, --pp)")
    dtype: str = setting("float32", help="model parameter dtype", choices=DTYPES)
    allow_nonfinite: bool = setting(False, help=NONFINITE_HELP)
    converted: Path | None = None  # set by `run_on_ranks` when it converted an HF model before spawning ranks

    def check_sizes(self, more: tuple[str, ...] = (), name: Callable[[str], str] | None = None) -> None:
        """The counts and sizes (these and the fields in `more`) must be >= 1, --seq-len >= 2; `name` names a field
        in the message (the command's flag by default; a recipe names its key)."""
        name = name or flag
        self.check_positive(("tokens", "tp", "ep", "pp", "micro_batch", *more), name)
        if self.seq_len < 2:
            raise UserError(f"{name('seq_len')} must be >= 2")

    def check_positive(self, fields: Iterable[str], name: Callable[[str], str]) -> None:
        """Each field (tp/ep/pp: the layout's sizes) must be >= 1."""
        for field in fields:
            value = getattr(self.parallel, field) if field in ("tp", "ep", "pp") else getattr(self, field)
            if value < 1:
                raise UserError(f"{name(field)} must be >= 1")


def flag(field: str) -> str:
    """A job field's command-line flag (jobs name their fields as the commands' flags)."""
    return "--" + field.replace("_", "-")


J = TypeVar("J", bound=ModelJob)


@contextmanager
def claimed_file(out: Path | None, inputs: Iterable[str | Path], overwrite: bool) -> Iterator[Path | None]:
    """A job's single-file output, claimed (`runtime.outputs.claim_output_file`: refused if it exists without
    `overwrite`, overlaps an input or cannot be created; locked) before any compute, by the process whose rank 0
    writes it; it appears only if the body completes. Yields the path rank 0 writes to, or None where nothing is
    claimed (no output, or another rank of a launched job)."""
    from megatron_slim.runtime.distributed import detect_env

    if out is None or detect_env().rank != 0:
        yield None
        return
    with claim_output_file(out, inputs=inputs, overwrite=overwrite) as staging:
        yield staging


def temp_checkpoint(base: Path) -> Path:
    """Where an HF model is converted for a job writing `base`: a name every rank derives alike."""
    return base.with_name(base.name + ".mcore-tmp")


def convert_in_child(hf_dir: Path, out_dir: Path, progress: bool, allow_nonfinite: bool = False) -> None:
    """hf_to_mcore builds a meta model under its own one-process group, which cannot happen inside a running
    multi-rank job: under torchrun/srun rank 0 converts in a child process that does not see the job's ranks."""
    cmd = [sys.executable, "-m", "megatron_slim.cli", "convert", "hf-to-mcore", "--hf", str(hf_dir), "--out",
           str(out_dir), "--overwrite", *([] if progress else ["--no-progress"]),
           *(["--allow-nonfinite"] if allow_nonfinite else [])]
    subprocess.run(cmd, env=child_env(without_launcher_env()), check=True)


def open_checkpoint(job: ModelJob, temp: Path, progress: bool) -> tuple[Path, Path | None]:
    """On every rank, once the process group exists: (the Megatron checkpoint to load, the tokenizer directory or
    None); converts an HF model into `temp` unless the launching process did."""
    import torch.distributed as dist

    from megatron_slim.checkpoint.files import Checkpoint

    model = Checkpoint.open(job.model)
    if job.converted is not None:
        ckpt = Path(job.converted)
    elif model.kind == "hf":
        ckpt = temp
        if dist.get_rank() == 0:
            convert_in_child(model.path, ckpt, progress=progress, allow_nonfinite=job.allow_nonfinite)
        dist.barrier()
    else:
        ckpt = model.path
    return ckpt, model.tokenizer_dir


def release_checkpoint(job: ModelJob, ckpt: Path) -> None:
    """After loading `ckpt` on every rank: rank 0 removes it when it is a temporary conversion."""
    import torch.distributed as dist

    if ckpt != Path(job.model):
        dist.barrier()  # every rank has loaded the temporary conversion
        if dist.get_rank() == 0:
            shutil.rmtree(ckpt)


def spawned_rank(command: str, worker: Callable[[J], None], job: J) -> None:
    """A local rank: input errors end the rank with status 2 and one line, as in a single-process run."""
    try:
        worker(job)
    except (UserError, FileNotFoundError) as e:
        if os.environ.get("RANK") == "0":
            print(f"megatron-slim {command}: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2)


def run_on_ranks(command: str, worker: Callable[[J], None], job: J, temp: Path, progress: bool) -> int:
    """Check the model against the job's layout, then run `worker(job)` on the launched ranks, or as a plain
    process on tp*ep*pp spawned local ranks (an HF model converted into `temp` before any process group exists).
    Returns the exit status; `command` names the command in a spawned rank's error line."""
    from megatron_slim.checkpoint.convert import hf_to_mcore
    from megatron_slim.checkpoint.files import Checkpoint
    from megatron_slim.models.config import validate_layout
    from megatron_slim.runtime.spawn import launched_world_size, run_local_world

    checkpoint = Checkpoint.open(job.model)
    model, is_mcore = checkpoint.path, checkpoint.kind == "mcore"
    try:
        validate_layout(checkpoint.config(), job.parallel)
    except ValueError as e:
        raise UserError(str(e)) from e

    launched = launched_world_size() is not None
    if not launched and not is_mcore:  # convert before any process group exists (cf. `convert_in_child`)
        hf_to_mcore(model, temp, overwrite=True, progress=progress, allow_nonfinite=job.allow_nonfinite)
        job = replace(job, converted=temp)
    # smallest world with room for tp*pp and ep*expert_tp*pp (expert_tp = tp)
    world = job.parallel.tp * job.parallel.ep * job.parallel.pp
    try:
        if not launched and world > 1:
            return run_local_world(spawned_rank, world, command, worker, job)
        worker(job)
    finally:
        if not is_mcore:  # rank 0 removes it once every rank has loaded it; this covers runs that failed earlier
            shutil.rmtree(temp, ignore_errors=True)
    return 0
