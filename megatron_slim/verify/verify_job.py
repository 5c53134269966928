"""`megatron-slim verify` as a typed job: transformers vs Megatron-Core logits on the same tokens, with a verdict.

A conversion that agrees with transformers on almost no next token (wrong weights, a mismatched config, another
model) is a failure (exit status 1), not a report to be read: `Thresholds` says what passes.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

from megatron_slim.engines.source import NONFINITE_HELP
from megatron_slim.errors import UserError
from megatron_slim.runtime import json_out
from megatron_slim.runtime.config_loader import setting
from megatron_slim.runtime.layout import ParallelLayout
from megatron_slim.verify.parity import Thresholds


@dataclass(frozen=True, kw_only=True)
class VerifyJob:
    """The `verify` command's flags, by the same names."""

    hf: str = setting(help="HF checkpoint directory (safetensors + config.json)")
    mcore: str = setting(help="Megatron-Core checkpoint directory (from `convert hf-to-mcore`)")
    parallel: ParallelLayout = setting(ParallelLayout(), help="the Megatron side's layout (--tp, --ep, --pp)",
                                       tp_help="tensor-parallel size for the Megatron side")
    batch: int = setting(2, help="sequences to compare")
    seq_len: int = setting(32, help="tokens per sequence")
    seed: int = setting(0, help="seed of the random token ids")
    min_top1: float = setting(Thresholds.min_top1_agreement, help="exit with status 1 when any head's top-1 "
                              "agreement is below this fraction (0 disables)")
    max_abs_diff: float | None = setting(Thresholds.max_abs_diff, help="exit with status 1 when the main head's "
                                         "max |diff| exceeds this")
    json: bool = setting(False, help="print the result as one JSON object")
    allow_nonfinite: bool = setting(False, help=NONFINITE_HELP)  # Megatron weights holding NaN/Inf

    @property
    def limits(self) -> Thresholds:
        """What passes (`min_top1`, `max_abs_diff`)."""
        return Thresholds(min_top1_agreement=self.min_top1, max_abs_diff=self.max_abs_diff)


def verify_worker(job: VerifyJob) -> int:
    """One rank: Megatron logits at the job's layout; the reporting rank compares them with transformers and
    prints. Every rank returns 1 when parity fails."""
    import torch
    import torch.distributed as dist

    from megatron_slim.checkpoint.mcore import load_model_config
    from megatron_slim.verify.parity import failures, hf_parity, megatron_logits, sample_tokens

    parallel = job.parallel
    tokens = sample_tokens(load_model_config(job.mcore).vocab_size, job.batch, job.seq_len, job.seed)
    _, logits, mtp = megatron_logits(job.mcore, tokens, parallel, allow_nonfinite=job.allow_nonfinite)
    failed = 0
    if logits is not None:
        report = hf_parity(job.hf, tokens, logits, mtp)
        report["layout"] = {"tp": parallel.tp, "ep": parallel.ep, "pp": parallel.pp, "world": dist.get_world_size()}
        if job.json:
            json_out.emit(report)
        else:
            for head, m in report.items():
                if head != "layout":
                    print(f"{head:>5}: max |diff| {m['max_abs_diff']:.3e}  mean |diff| {m['mean_abs_diff']:.3e}  "
                          f"top-1 agreement {m['top1_agreement'] * 100:.2f}%", flush=True)
        missed = failures(report, job.limits)
        for line in missed:
            print(f"megatron-slim verify: parity FAILED: {line}", file=sys.stderr, flush=True)
        failed = int(bool(missed))
    flag = torch.tensor([failed])
    dist.all_reduce(flag)
    return int(flag.item())


def run_verify(job: VerifyJob) -> int:
    """0 when the heads agree within `job.limits`, 1 when not (on the launched ranks or tp*pp*EP local ones)."""
    from megatron_slim.checkpoint.mcore import load_model_config
    from megatron_slim.models.config import validate_layout
    from megatron_slim.runtime.spawn import run_on_world

    cfg = load_model_config(job.mcore)
    p = job.parallel
    try:  # before any rank starts: megatron-core would assert deep inside every rank (a traceback each)
        validate_layout(cfg, p)
    except ValueError as e:
        raise UserError(f"--tp {p.tp} --ep {p.ep} --pp {p.pp}: {e}") from None
    return run_on_world(verify_worker, math.lcm(p.tp, p.ep) * p.pp, job)
