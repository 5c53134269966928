"""The non-finite guard: bf16 training has no loss scaler to catch a NaN/Inf, so without a guard one bad step writes
NaN into every weight and the run carries on (and checkpoint rotation then deletes the last good checkpoints).

Each step the trainer asks `StepGuard.verdict` before the optimizer step, with the step's loss on the ranks that
hold it (the last pipeline stage) and nothing elsewhere; the verdict is agreed on by every rank (one all-reduce),
so the update is skipped everywhere alike. Non-finite gradients are caught by megatron-core's optimizer itself:
the trainer builds it with a constant loss scale of 1 (exact: the loss is multiplied by 1), which makes the
optimizer check every gradient shard for NaN/Inf, agree across ranks and skip the update (weights, Adam moments and
step counts untouched) when one is found. After `max_skipped_steps` consecutive skips the trainer stops without
saving and exits with DIVERGED_EXIT_CODE.

Fault injection for tests and drills: MEGATRON_SLIM_INJECT_NAN_STEPS=5,9 multiplies the loss of steps 5 and 9
(1-based, counted in the run's own steps) by NaN, so its gradients are NaN too.
"""
from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_slim.errors import UserError
from megatron_slim.train.config import GuardSection

DIVERGED_EXIT_CODE = 86  # the run stopped after guard.max_skipped_steps consecutive non-finite steps
INJECT_ENV = "MEGATRON_SLIM_INJECT_NAN_STEPS"


def injected_nan_steps() -> frozenset[int]:
    """The steps (1-based) whose loss the environment asks to poison."""
    raw = os.environ.get(INJECT_ENV, "").strip()
    if not raw:
        return frozenset()
    try:
        steps = frozenset(int(x) for x in raw.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{INJECT_ENV}={raw!r}: expected comma-separated step numbers, e.g. 5,9") from None
    if any(s < 1 for s in steps):
        raise UserError(f"{INJECT_ENV}={raw!r}: steps are 1-based")
    return steps


def poisoned(forward_step):
    """`forward_step` whose loss (and every reported term) is NaN: what a diverging step looks like."""

    def step(data_iterator, model):
        output, loss_func = forward_step(data_iterator, model)

        def nan_loss(logits):
            total, parts = loss_func(logits)
            return total * float("nan"), {k: v * float("nan") for k, v in parts.items()}

        return output, nan_loss

    return step


@dataclass
class Verdict:
    skip: bool  # skip the update (non-finite loss, or a spike with skip_spikes)
    non_finite: bool
    spike: bool


class StepGuard:
    def __init__(self, cfg: GuardSection) -> None:
        self.cfg = cfg
        self.consecutive = 0  # skipped steps in a row
        self.total = 0  # skipped steps in this process's life
        self._recent: deque[float] = deque(maxlen=cfg.spike_window)

    def median(self) -> float | None:
        return float(torch.tensor(list(self._recent)).median()) if self._recent else None

    def verdict(self, loss: float | None) -> Verdict:
        """Collective: `loss` is the step's (data-parallel mean) loss where this rank holds it, else None. Every
        rank gets the same verdict."""
        non_finite = loss is not None and not math.isfinite(loss)
        median = self.median()
        spike = (self.cfg.spike_factor > 0 and loss is not None and not non_finite and median is not None
                 and len(self._recent) >= min(10, self.cfg.spike_window) and loss > self.cfg.spike_factor * median)
        flags = torch.tensor([float(non_finite), float(spike)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            from megatron_slim.runtime.distributed import local_device

            flags = flags.to(local_device())
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        non_finite, spike = bool(flags[0] > 0), bool(flags[1] > 0)
        return Verdict(skip=non_finite or (spike and self.cfg.skip_spikes), non_finite=non_finite, spike=spike)

    def record(self, loss: float | None, skipped: bool) -> None:
        """After the step: count it, and remember a finite loss of an update that happened."""
        if skipped:
            self.consecutive += 1
            self.total += 1
            return
        self.consecutive = 0
        if loss is not None and math.isfinite(loss):
            self._recent.append(loss)

    @property
    def exhausted(self) -> bool:
        return self.consecutive >= self.cfg.max_skipped_steps
