"""Stand-in for a preemptible trainer, for launch.sh's requeue contract.

Counts up to --target, saving the count to STATE/counter-<rank> after every step and resuming from it on start.
On SIGUSR1 or SIGTERM it saves, logs `preempted N` and exits 75 (launch.sh then requeues the job); at the target
it logs `finished N` and exits 0. Events go to STATE/events-<rank> (one line each) and to stdout.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

EXIT_REQUEUE = 75

stop_signal: int | None = None


def on_signal(signum: int, _frame: object) -> None:
    global stop_signal
    stop_signal = signum


def save(path: Path, value: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{value}\n")
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("state", type=Path)
    parser.add_argument("--target", type=int, required=True)
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args()

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    counter_file = args.state / f"counter-{rank}"
    events = args.state / f"events-{rank}"

    def log(message: str) -> None:
        with events.open("a") as f:
            f.write(message + "\n")
        print(f"rank {rank}: {message}", flush=True)

    count = int(counter_file.read_text()) if counter_file.exists() else 0
    log(f"start {count} restart={os.environ.get('SLURM_RESTART_COUNT', '0')}")
    while count < args.target:
        if stop_signal is not None:
            save(counter_file, count)
            log(f"preempted {count} by {signal.Signals(stop_signal).name}")
            return EXIT_REQUEUE
        time.sleep(args.interval)
        count += 1
        save(counter_file, count)
    log(f"finished {count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
