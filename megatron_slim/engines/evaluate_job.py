"""Evaluate a model on held-out data and on lm-eval tasks: `EvaluateJob` and the functions that run it
(`run_evaluate` from a command, `evaluate_worker` on each rank of a running job, as a recipe's step does), and the
table a person reads. See megatron_slim/eval/metrics.py for the held-out metrics, eval/harness.py for the tasks."""
from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_slim.engines.source import (
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
from megatron_slim.runtime import json_out
from megatron_slim.runtime.config_loader import setting
from megatron_slim.runtime.outputs import atomic_write

if TYPE_CHECKING:
    from megatron_slim.eval.harness import TaskSpec


@dataclass(frozen=True, kw_only=True)
class EvaluateJob(ModelJob):
    """The `evaluate` command's flags, by the same names; `model` is echoed in the result. Held-out metrics need
    `data` and `tokens`; lm-eval scores need `tasks`; either or both."""

    data: str | None = setting(None, help=data_help("evaluation"))
    tokens: int = setting(0, help="evaluation tokens (rounded up to whole windows of --seq-len)")
    seq_len: int = setting(4096, help="tokens per evaluation window")
    tasks: tuple[str, ...] = setting((), help="comma-separated lm-eval task or group names", many="comma")
    num_fewshot: int | None = setting(None, help="few-shot examples per task (default: the task's)")
    limit: float | None = setting(None, help="documents per task (a fraction when < 1)")
    include_path: tuple[Path, ...] = setting((), help="directory of extra lm-eval YAML tasks (repeatable)",
                                             many="append")
    batch_size: int = setting(8, help="lm-eval requests per forward")
    mtp_k: int = setting(4, help="MTP drafts per speculative step (0: no MTP acceptance)")
    mtp_prompts: int = setting(8, help="prompts for MTP acceptance")
    prompt_len: int = setting(256, help="prompt tokens (at most --seq-len)")
    gen_tokens: int = setting(32, help="greedy tokens generated per prompt; must exceed --mtp-k")
    json: bool = setting(False, help="print the result as one JSON object")
    out: Path | None = setting(None, help="also write the JSON result to this file")
    overwrite: bool = setting(False, help="replace --out if it exists")
    write_to: Path | None = None  # where rank 0 writes `out` (its staging path, see `run_evaluate`)

    def validate(self, name: Callable[[str], str] = flag) -> None:
        """Refuse what no layout or data can run; `name` names a field in the message (the command's flag by
        default; a recipe names its key)."""
        if self.data is None and not self.tasks:
            raise UserError("nothing to evaluate: give --data and --tokens (held-out metrics), --tasks, or both")
        if self.data is None:
            self.check_sizes(("batch_size",) if self.tasks else (), name)
        else:
            self.check_sizes(("mtp_prompts", "prompt_len", "batch_size"), name)
        if self.tasks:
            self.task_spec().validate(name)
        if self.mtp_k < 0:
            raise UserError(f"{name('mtp_k')} must be >= 0")
        if self.mtp_k and self.gen_tokens <= self.mtp_k:
            raise UserError(f"{name('gen_tokens')} ({self.gen_tokens}) must exceed {name('mtp_k')} ({self.mtp_k})")

    def check_sizes(self, more: tuple[str, ...] = (), name: Callable[[str], str] | None = None) -> None:
        """As ModelJob's, except that --tokens only counts with --data."""
        if self.data is not None:
            super().check_sizes(more, name)
            return
        self.check_positive(("tp", "ep", "pp", "micro_batch", *more), name or flag)

    def task_spec(self) -> TaskSpec:
        from megatron_slim.eval.harness import TaskSpec

        return TaskSpec(tasks=self.tasks, num_fewshot=self.num_fewshot, limit=self.limit,
                        include_path=self.include_path)

    def temp_checkpoint(self) -> Path:
        """Where an HF model is converted: next to `out`, else in the working directory."""
        base = self.out if self.out else Path.cwd() / f"evaluate-{Path(self.model).resolve().name}"
        return temp_checkpoint(base)


def format_table(result: dict) -> str:
    """The human-readable report: held-out metrics (when evaluated), then one row per task and metric."""
    lines = []
    if "loss" in result:
        lines += [f"tokens     {result['tokens']}",
                  f"loss       {result['loss']:.4f} ± {result['loss_se']:.4f} nats/token (standard error over "
                  f"{len(result['window_losses'])} windows)",
                  f"ppl        {result['ppl']:.3f}", f"accuracy   {result['accuracy'] * 100:.2f}%"]
    if result.get("mtp_acceptance"):
        lines.append(f"MTP acceptance over {result['mtp_positions']} drafting positions:")
        lines += [f"  @{k:<8} {rate * 100:.2f}%" for k, rate in result["mtp_acceptance"].items()]
        lines.append(f"  mean accepted drafts per step {result['mean_accepted']:.3f}")
    if result.get("tasks"):
        width = max(len(t) for t in result["tasks"])
        lines.append(f"{'task':<{width}}  {'metric':<16} value")
        lines += [f"{task:<{width}}  {metric:<16} {value:.4f}"
                  for task, metrics in result["tasks"].items() for metric, value in metrics.items()]
    return "\n".join(lines)


def evaluate_worker(job: EvaluateJob) -> None:
    """One rank of the evaluation (every rank of the job runs it); rank 0 prints the result and writes `job.out`."""
    import torch
    import torch.distributed as dist

    from megatron_slim.checkpoint.mcore import load_model, load_model_config
    from megatron_slim.data.calibration import calibration_windows, eos_token_id
    from megatron_slim.eval.heldout import evaluate
    from megatron_slim.models.builder import BuildOptions, build_model
    from megatron_slim.runtime.distributed import init_model_parallel
    parallel = job.parallel
    init_model_parallel(parallel)
    rank = dist.get_rank()
    ckpt, tokenizer_dir = open_checkpoint(job, job.temp_checkpoint(), progress=False)
    cfg = load_model_config(ckpt)

    windows = prompts = None
    if job.data is not None:
        wanted = math.ceil(job.tokens / job.seq_len)
        with_mtp = job.mtp_k > 0 and cfg.mtp_num_layers > 0
        windows = calibration_windows(job.data, job.seq_len, max(wanted, job.mtp_prompts if with_mtp else 1),
                                      eos_token_id(cfg.hf_config, tokenizer_dir), tokenizer_dir, cfg.vocab_size)
        if len(windows) == 0:
            raise UserError(f"{job.data} holds fewer than {job.seq_len} tokens: not one evaluation window")
        if len(windows) < wanted and rank == 0:
            print(f"warning: {job.data} runs out after {len(windows) * job.seq_len} tokens (of "
                  f"{wanted * job.seq_len})", file=sys.stderr)
        prompts = windows[:job.mtp_prompts, :job.prompt_len] if with_mtp else None
        windows = windows[:wanted]

    opts = BuildOptions(params_dtype=getattr(torch, job.dtype), perform_initialization=False)  # loaded next
    model = build_model(cfg, parallel, opts)
    load_model(model, ckpt, allow_nonfinite=job.allow_nonfinite)
    release_checkpoint(job, ckpt)
    result: dict = {}
    if windows is not None:
        result = evaluate(model, cfg, windows, job.micro_batch, mtp_k=job.mtp_k, prompts=prompts,
                          gen_tokens=job.gen_tokens)
    if job.tasks:
        from megatron_slim.eval.harness import score_tasks  # lm-eval (and datasets) load only when asked for

        result["tasks"], errors = score_tasks(model, cfg, tokenizer_dir, job.task_spec(), batch_size=job.batch_size,
                                              micro_batch=job.micro_batch)
        if errors:
            result["task_errors"] = errors
            if rank == 0:
                for task, error in errors.items():
                    print(f"warning: task {task} failed, the other tasks' scores are kept: {error}", file=sys.stderr)
    if rank != 0:
        return
    report = result | {"model": str(job.model),
                       "layout": {"tp": parallel.tp, "ep": parallel.ep, "pp": parallel.pp,
                                  "world": dist.get_world_size()}}
    if job.data is not None:
        report |= {"data": str(job.data), "seq_len": job.seq_len}
    text = json_out.dumps(report)  # NaN/Inf (a diverged model) as null, listed under "nonfinite"
    if job.write_to:
        job.write_to.write_text(text + "\n")
    elif job.out:
        atomic_write(job.out, text + "\n")
    if job.json:
        json_out.emit(report)
    else:
        print(format_table(result), flush=True)


def run_evaluate(job: EvaluateJob) -> int:
    """Validate the job (data files exist, every task is known and its data loads) and evaluate on the launched
    ranks, or on tp*ep*pp spawned local ranks; the exit status. `out` is claimed first, so an existing or unwritable
    one fails before any compute."""
    from megatron_slim.data.calibration import check_source

    job.validate()
    job = replace(job, prompt_len=min(job.prompt_len, job.seq_len))
    if job.data is not None:
        check_source(job.data)
    if job.tasks:
        from megatron_slim.checkpoint.files import Checkpoint
        from megatron_slim.eval.harness import check_tasks, text_tokenizer

        text_tokenizer(Checkpoint.open(job.model).tokenizer_dir)
        check_tasks(job.task_spec())
    inputs = [job.model] + ([job.data] if job.data is not None else [])
    with claimed_file(job.out, inputs, job.overwrite) as staging:
        status = run_on_ranks("evaluate", evaluate_worker, replace(job, write_to=staging), job.temp_checkpoint(),
                              progress=False)
        if status:
            raise SystemExit(status)  # leaves `out` as it was
    return 0
