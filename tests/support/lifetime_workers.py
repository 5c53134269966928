"""A rank for `runtime.spawn.run_local_world` that stands in for a trainer, light enough to start in a second:
it forks a helper (as megatron-core's checkpoint writer does), then works until SIGTERM (deaf to SIGINT),
"checkpoints" and ends with the requeue status, as `train` does on preemption."""
from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path


def _helper() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the rank's handler, inherited through fork
    while True:
        time.sleep(1)


def preemptible(out: str) -> int:
    stop = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    # torch.multiprocessing asks for SIGINT when the launcher dies; a rank blocked in a collective (C++) does not
    # act on it, so only our own parent-death SIGKILL (`runtime.lifetime`) may end it: be such a rank
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    helper = multiprocessing.get_context("fork").Process(target=_helper, daemon=True)
    helper.start()
    rank = os.environ["RANK"]
    (Path(out) / f"rank{rank}.pids").write_text(f"{os.getpid()} {helper.pid}")
    while not stop:
        time.sleep(0.05)
    (Path(out) / f"rank{rank}.checkpoint").write_text("saved")
    return 75
