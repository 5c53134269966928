"""The preemption contract with launch.sh: SIGTERM/SIGUSR1 ask the job to checkpoint at its next safe point and
exit with REQUEUE_EXIT_CODE, on which launch.sh requeues it (SLURM sends USR1 before a time limit or preemption).
torch is imported where it is used, so that the CLI reads this module without it.
"""
from __future__ import annotations

import signal
from types import FrameType
from typing import Any

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL
_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals() -> None:
    """Called once the process has agreed to exit with REQUEUE_EXIT_CODE: from here on SIGTERM/SIGUSR1 are ignored.
    srun --kill-on-bad-exit=1 (launch.sh) sends SIGTERM to the other ranks as soon as the first rank exits 75; a
    rank still tearing down must exit 75 too, not die of the signal (143), or launch.sh would not requeue the job."""
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopFlag:
    """Set by SIGTERM/SIGUSR1; checked (and agreed on by all ranks) at safe points. Flags nest: an inner one (the
    trainer's, inside a run's step) starts raised when the outer one already is (the signal came while the step
    was setting up: loading a teacher can take minutes), passes later signals on to the outer one, and `restore()`
    puts the outer back, so a signal is never lost between two safe points of different owners."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: dict[int, Any] = {}
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        self.raised |= any(isinstance(getattr(h, "__self__", None), StopFlag) and h.__self__.raised
                           for h in self._previous.values())

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.raised = True
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank was signalled."""
        import torch
        import torch.distributed as dist

        from megatron_slim.runtime.distributed import local_device

        device = local_device()
        flag = torch.tensor([int(self.raised)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
