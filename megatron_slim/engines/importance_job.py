"""Collect calibration statistics of a model into an importance file: `ImportanceJob` and the functions that run
it (`run_importance` from a command, `importance_worker` on each rank of a running job, as a recipe's step does).
See megatron_slim/compress/importance_file.py for what is collected."""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from megatron_slim.engines.source import (
    DTYPES,
    ModelJob,
    claimed_file,
    data_help,
    flag,
    open_checkpoint,
    release_checkpoint,
    run_on_ranks,
    temp_checkpoint,
)
from megatron_slim.errors import UserError
from megatron_slim.runtime.config_loader import setting


@dataclass(frozen=True, kw_only=True)
class ImportanceJob(ModelJob):
    """The `importance` command's flags, by the same names (progress: not --no-progress)."""

    data: str = setting(help=data_help("calibration"))
    tokens: int = setting(help="calibration tokens (rounded up to whole steps of DP ranks x micro-batch x seq-len)")
    seq_len: int = setting(4096, help="tokens per calibration window")
    dtype: str = setting("float32", help="model parameter dtype (statistics are accumulated in float64 either way)",
                         choices=DTYPES)
    out: Path = setting(help="output importance file (.safetensors)")
    layer_loss: bool = setting(False, help="also measure each decoder layer's LM-loss increase when skipped (one "
                                           "extra forward per layer and batch)")
    max_tokens: int | None = setting(None, help="hard budget: never run more calibration tokens than this (rounds "
                                                "--tokens down instead of up)")
    overwrite: bool = setting(False, help="replace --out if it exists")
    progress: bool = setting(True, help="no progress bar")
    write_to: Path | None = None  # where rank 0 writes the file (`out`'s staging path, see `run_importance`)

    def validate(self, name: Callable[[str], str] = flag) -> None:
        """Refuse what no layout or data can run; `name` names a field in the message (the command's flag by
        default; a recipe names its key)."""
        self.check_sizes(name=name)
        if self.max_tokens is not None and self.max_tokens < self.seq_len * self.micro_batch:
            # the collection's step is (data-parallel ranks x) micro_batch windows of seq_len tokens
            raise UserError(f"{name('max_tokens')} {self.max_tokens} is below one step of {self.micro_batch} "
                            f"sequences of {self.seq_len} tokens")


def importance_worker(job: ImportanceJob) -> None:
    """One rank of the collection (every rank of the job runs it); rank 0 writes `job.out`."""
    import torch
    import torch.distributed as dist

    from megatron_slim.checkpoint.fingerprint import model_fingerprint
    from megatron_slim.checkpoint.mcore import load_model, load_model_config
    from megatron_slim.compress.importance_hooks import CollectOptions, collect, sequence_count
    from megatron_slim.data.calibration import calibration_windows, eos_token_id
    from megatron_slim.models.builder import BuildOptions, build_model
    from megatron_slim.runtime.distributed import init_model_parallel
    parallel = job.parallel
    init_model_parallel(parallel)
    rank = dist.get_rank()
    ckpt, tokenizer_dir = open_checkpoint(job, temp_checkpoint(job.out), progress=job.progress)
    cfg = load_model_config(ckpt)
    fingerprint = model_fingerprint(job.model) if rank == 0 else None  # of the model as given, HF or Megatron

    group = parallel.dp(dist.get_world_size()) * job.micro_batch
    wanted = sequence_count(job.tokens, job.seq_len, group, job.max_tokens)
    windows = calibration_windows(job.data, job.seq_len, wanted, eos_token_id(cfg.hf_config, tokenizer_dir),
                                  tokenizer_dir, cfg.vocab_size)
    usable = len(windows) - len(windows) % group
    if usable == 0:
        raise UserError(f"{job.data} holds {len(windows)} windows of {job.seq_len} tokens; one step needs {group}")
    if usable < wanted and rank == 0:
        print(f"warning: {job.data} runs out after {usable * job.seq_len} tokens (of {wanted * job.seq_len})",
              file=sys.stderr)

    opts = BuildOptions(params_dtype=getattr(torch, job.dtype), perform_initialization=False)  # loaded next
    model = build_model(cfg, parallel, opts)
    load_model(model, ckpt, allow_nonfinite=job.allow_nonfinite)  # NaN/Inf would make every statistic NaN
    release_checkpoint(job, ckpt)
    result = collect(model, cfg, windows[:usable],
                     CollectOptions(micro_batch=job.micro_batch, layer_loss=job.layer_loss, progress=job.progress))
    if result is not None:
        result.data, result.fingerprint = str(job.data), fingerprint
        result.options |= {"tp": parallel.tp, "ep": parallel.ep, "pp": parallel.pp, "world": dist.get_world_size(),
                           "dtype": job.dtype}
        result.save(job.write_to or job.out)
        print(f"wrote {job.out}: {result.tokens} tokens ({usable} x {job.seq_len}), LM loss "
              f"{result.options['lm_loss']:.4f}, {len(result.tensors)} tensors", flush=True)


def run_importance(job: ImportanceJob) -> int:
    """Validate the job and collect on the launched ranks, or on tp*ep*pp spawned local ranks; the exit status.
    The output is claimed first, so an existing or unwritable one fails before any compute."""
    from megatron_slim.data.calibration import check_source

    job.validate()
    check_source(job.data)
    with claimed_file(job.out, [job.model, job.data], job.overwrite) as staging:
        status = run_on_ranks("importance", importance_worker, replace(job, write_to=staging),
                              temp_checkpoint(job.out), progress=job.progress)
        if status:
            raise SystemExit(status)  # leaves `out` as it was
    return 0
