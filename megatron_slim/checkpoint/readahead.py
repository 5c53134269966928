"""Read-ahead of checkpoint bytes into the page cache, in the order a converter will read them.

A converter spends seconds importing megatron-core and building its meta-device model before it reads the first
tensor, and then alternates between reading, transforming and writing. `ReadAhead` keeps the disk busy through
both: a daemon thread asks the kernel for the input ranges in read order, from the start, staying at most a window
of bytes ahead of what the converter has consumed (half the memory the kernel reports available, so pages read
early are not evicted before they are used).

`posix_fadvise(WILLNEED)` reads at most the device's read-ahead size per call (8 MiB here, 128 KiB by default), so
ranges are advised in chunks of the read-ahead size sysfs gives for the file's device (128 KiB where it says
nothing): chunks of 8 MiB instead of 128 KiB cost ~40% less system time per GB read (1.07 against 1.75 CPU s
for 6.35 GB, cold). The calls return once the reads are queued and block only while the device queue is full,
which is why they run on their own thread.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

_CHUNK = 128 * 1024  # the kernel's default read-ahead size: one WILLNEED call reads at least this much
_MAX_CHUNK = 64 << 20  # a bound on one call, whatever sysfs says (the window is counted in chunks)


def read_ahead_bytes(dev: int) -> int:
    """What one WILLNEED call reads at most of a file on device `dev` (a stat's st_dev): the device's read-ahead
    size (sysfs: the block device, the disk of a partition, or the filesystem's backing device), else the kernel's
    default."""
    name = f"{os.major(dev)}:{os.minor(dev)}"
    for where in (f"/sys/dev/block/{name}/queue", f"/sys/dev/block/{name}/../queue", f"/sys/class/bdi/{name}"):
        try:
            kb = int(Path(where, "read_ahead_kb").read_text())
        except (OSError, ValueError):
            continue
        return min(max(kb * 1024, _CHUNK), _MAX_CHUNK)
    return _CHUNK


def advise_willneed(path: Path, offset: int, length: int) -> None:
    """Queue one range (up to the device's read-ahead size) for reading into the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def _available_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


def _merge(ranges: list[tuple[Path, int, int]]) -> list[tuple[Path, int, int]]:
    """Adjacent ranges of one file as one (tensors stored back to back are read back to back)."""
    out: list[tuple[Path, int, int]] = []
    for path, start, length in ranges:
        if out and out[-1][0] == path and out[-1][1] + out[-1][2] == start:
            out[-1] = (path, out[-1][1], out[-1][2] + length)
        else:
            out.append((path, start, length))
    return out


class ReadAhead:
    """Reads `ranges` (file, offset, length; in the order they will be consumed) ahead of the consumer, which
    reports its progress with `consumed(nbytes)`. A context manager: leaving it stops the thread."""

    def __init__(self, ranges: list[tuple[Path, int, int]], window: int | None = None) -> None:
        self._ranges = _merge(ranges)
        self._window = _available_memory() // 2 if window is None else window
        self._consumed = 0
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="read-ahead", daemon=True)
        self._thread.start()

    def consumed(self, nbytes: int) -> None:
        with self._cond:
            self._consumed += nbytes
            self._cond.notify()

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        issued = 0
        chunks: dict[int, int] = {}  # device -> its read-ahead size
        for path, start, length in self._ranges:
            fd = os.open(path, os.O_RDONLY)
            try:
                dev = os.fstat(fd).st_dev
                if dev not in chunks:
                    chunks[dev] = read_ahead_bytes(dev)
                chunk = chunks[dev]
                for offset in range(start, start + length, chunk):
                    with self._cond:
                        self._cond.wait_for(lambda: self._stop or issued - self._consumed < self._window)
                        if self._stop:
                            return
                    n = min(chunk, start + length - offset)
                    os.posix_fadvise(fd, offset, n, os.POSIX_FADV_WILLNEED)
                    issued += n
            finally:
                os.close(fd)
