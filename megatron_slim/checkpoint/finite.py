"""Refusing non-finite weights (NaN or Inf) as a converter streams them: a model that holds any computes NaN losses
and statistics ("LM loss nan") far from the cause, so conversion names the first such tensor instead.

Checked tensor by tensor as they are read, never as a second pass over the model: tensors a converter reads into
memory are checked there; tensors whose bytes it copies file to file (`checkpoint.splice`) are read once in chunks
through one reused buffer, from the page cache the read-ahead filled, on threads of their own (`CheckPool`) while
the converter goes on. `convert --allow-nonfinite` skips it all.
Every command that loads a Megatron checkpoint into a model (evaluate, importance, verify, add-mtp, training's
teacher, student and resume) checks the loaded parameters the same way (`refuse_nonfinite_model`), with the same
`--allow-nonfinite` escape: a training run whose loss went NaN saves such weights.
"""
from __future__ import annotations

import os
import threading
from collections import deque
from pathlib import Path
from typing import BinaryIO

import torch

from megatron_slim.errors import CheckpointError

_CHUNK_BYTES = 1 << 20  # the read buffer of stored tensors (small enough to stay in the CPU's cache between the
# read and the check) and the chunk of the exact check's masks
_JOB_BYTES = 32 << 20  # the most of a tensor one of `CheckPool`'s threads checks or copies at a time


# 16-bit floats are NaN or Inf exactly when all their exponent bits are set: a test on the bits, several times
# faster on CPU than `isfinite`, which converts every element to float32 first.
_EXPONENT_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}
# dtypes whose `sum` is a vectorised pass with no temporary (about 0.1 s per GB on one core, a tenth of the bit test)
_SUMMABLE = frozenset({torch.bfloat16, torch.float16, torch.float32, torch.float64})


def _sum_settles_finite(t: torch.Tensor) -> bool:
    """True when one cheap pass proves `t` finite: a sum is NaN or Inf if any term is, so a finite sum settles it;
    a non-finite one (a NaN or Inf, or only an overflowing sum) settles nothing."""
    return t.numel() == 0 or (t.dtype in _SUMMABLE and bool(torch.isfinite(t.sum())))


def _all_finite(chunk: torch.Tensor) -> bool:
    """Exact: the sum's shortcut, else the per-element test."""
    if _sum_settles_finite(chunk):
        return True
    mask = _EXPONENT_BITS.get(chunk.dtype)
    if mask is not None:
        return int((chunk.view(torch.int16) & mask).amax()) != mask
    return bool(torch.isfinite(chunk).all())


def _counts(t: torch.Tensor) -> tuple[int, int] | None:
    """(NaN count, Inf count) of a floating-point tensor that holds any, else None; the per-element test runs on
    bounded chunks, and only where the whole tensor's sum is not finite."""
    if not t.is_floating_point() or t.is_meta:
        return None
    flat = t.reshape(-1)
    if _sum_settles_finite(flat):
        return None
    step = max(1, _CHUNK_BYTES // max(1, t.element_size()))
    for start in range(0, flat.numel(), step):
        if not _all_finite(flat[start:start + step]):
            return int(torch.isnan(flat).sum()), int(torch.isinf(flat).sum())
    return None


def _refuse(where: str, name: str, numel: int, counts: tuple[int, int]) -> CheckpointError:
    nan, inf = counts
    return CheckpointError(f"{where}: {name} holds {nan} NaN and {inf} infinite values (of {numel}); refusing a "
                           "model with non-finite weights (--allow-nonfinite uses it anyway)")


def nonfinite_error(where: str, name: str, t: torch.Tensor) -> CheckpointError | None:
    """The error naming `name` (in `where`) if the tensor holds NaN or Inf, else None."""
    counts = _counts(t)
    return None if counts is None else _refuse(where, name, t.numel(), counts)


def check_finite(where: str, name: str, t: torch.Tensor) -> None:
    """Raise a CheckpointError naming `name` (in `where`) if the tensor holds NaN or Inf."""
    error = nonfinite_error(where, name, t)
    if error is not None:
        raise error


def _read_exact(fd: int, into: memoryview, offset: int, path: Path, name: str) -> None:
    done = 0
    while done < into.nbytes:  # one read returns at most ~2 GiB
        n = os.preadv(fd, [into[done:]], offset + done)
        if n == 0:
            raise CheckpointError(f"{path}: truncated while reading {name}")
        done += n


class FileRangeCheck:
    """Checks tensors stored as bytes in files (read through one reused buffer, a chunk at a time); `copy` also
    writes the bytes it checked."""

    def __init__(self) -> None:
        self._buffer = torch.empty(_CHUNK_BYTES, dtype=torch.uint8)

    def check(self, where: str, name: str, path: Path, start: int, nbytes: int, dtype: torch.dtype,
              whole: tuple[int, int] | None = None) -> None:
        """Refuse bytes [start, start + nbytes) of `path` if they hold NaN or Inf; `whole`: the (start, nbytes) of
        the tensor `name` they are part of (the error counts over it), if not all of it."""
        if dtype.is_floating_point:
            self.copy(where, name, path, start, nbytes, dtype, None, whole)

    def copy(self, where: str, name: str, path: Path, start: int, nbytes: int, dtype: torch.dtype,
             out: BinaryIO | None, whole: tuple[int, int] | None = None) -> None:
        """`check`, writing each chunk checked to `out` (a file positioned where they go): one read serves the check
        and the copy, which beats a check plus a kernel copy wherever source and destination offsets differ
        modulo a page (the kernel then copies at half its page-aligned speed: 0.8 against 0.36 CPU s per GB)."""
        size = torch.empty((), dtype=dtype).element_size()
        step = _CHUNK_BYTES - _CHUNK_BYTES % size
        view = memoryview(self._buffer.numpy())
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset in range(0, nbytes, step):
                n = min(step, nbytes - offset)
                _read_exact(fd, view[:n], start + offset, path, name)
                if dtype.is_floating_point and _counts(self._buffer[:n].view(dtype)) is not None:
                    at, length = whole or (start, nbytes)  # error path: count over the whole tensor
                    tensor = torch.empty(length, dtype=torch.uint8)
                    _read_exact(fd, memoryview(tensor.numpy()), at, path, name)
                    raise _refuse(where, name, length // size, _counts(tensor.view(dtype)))
                if out is not None:
                    out.write(view[:n])
        finally:
            os.close(fd)


class _WriteAt:
    """A file's bytes from `offset` on, as a stream `FileRangeCheck.copy` writes to (positioned writes, so the
    file's other writer may be elsewhere in it meanwhile)."""

    def __init__(self, fd: int, offset: int) -> None:
        self._fd, self._offset = fd, offset

    def write(self, view: memoryview) -> None:
        done = 0
        while done < view.nbytes:
            done += os.pwrite(self._fd, view[done:], self._offset + done)
        self._offset += done


class CheckPool:
    """`FileRangeCheck.check` (or `copy`) of byte ranges on worker threads, so that a converter's checks run on other
    cores while it goes on. mcore-to-hf submits each tensor the kernel copied file to file (to be read back from the
    page cache and summed, the GIL released throughout), and each tensor the kernel would copy at half speed (source
    and destination offsets that differ modulo a page) with the place it goes (`into`): a worker copies it as it
    checks it, one read serving both. One thread doing that kept a core busy and fed the disk ~600 MB/s where it
    takes ~1 GB/s (measured: a 2-core VM), so two share the work, in pieces of at most 32 MiB, and each piece
    copied is handed to the disk at once (else the kernel starts writing only GBs later, and the sync waits).

    At most `lag` bytes wait to be checked (the copies stay that close ahead, so the bytes to check are still in the
    page cache). A non-finite tensor stops the workers; the error of the earliest range submitted that failed is
    raised by the next `submit` and by `finish`, which waits until every range submitted is checked (and copied).
    A context manager: leaving it, on success or on error, stops the threads."""

    def __init__(self, threads: int = 2, lag: int = 1 << 30) -> None:
        self._lag = lag
        self._jobs: deque[tuple[int, tuple, tuple[int, int] | None, tuple[Path, int] | None]] = deque()
        self._submitted = 0
        self._running = 0  # jobs taken by a worker, not yet done
        self._pending = 0  # bytes submitted, not yet checked
        self._errors: dict[int, BaseException] = {}  # by submission number
        self._outputs: dict[Path, int] = {}  # descriptors of the files copied into
        self._stop = False
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._run, args=(FileRangeCheck(),), name="nonfinite-check",
                                          daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _failed(self) -> BaseException | None:
        """The error of the earliest range that failed, once none is being checked (an earlier one may yet fail)."""
        return self._errors[min(self._errors)] if self._errors and not self._running else None

    def submit(self, where: str, name: str, path: Path, start: int, nbytes: int, dtype: torch.dtype,
               whole: tuple[int, int] | None = None, into: tuple[Path, int] | None = None) -> None:
        """Queue `FileRangeCheck.check(where, name, path, start, nbytes, dtype, whole)`, or with `into` (a file and
        an offset in it) its `copy` to there; raise the error of a range checked earlier, if any."""
        if into is None and not dtype.is_floating_point:
            return
        whole = whole or (start, nbytes)
        with self._cond:
            self._cond.wait_for(lambda: self._failed() is not None or self._pending < self._lag)
            if self._failed() is not None:
                raise self._failed()
            for at in range(0, nbytes, _JOB_BYTES):  # in pieces, which the threads share (an embedding is 1 GB)
                n = min(_JOB_BYTES, nbytes - at)
                self._jobs.append((self._submitted, (where, name, path, start + at, n, dtype), whole,
                                   None if into is None else (into[0], into[1] + at)))
                self._submitted += 1
            self._pending += nbytes
            self._cond.notify_all()

    def finish(self) -> None:
        """Wait until every range submitted is checked; raise the first error."""
        with self._cond:
            self._cond.wait_for(lambda: self._failed() is not None or not self._jobs and not self._running)
            if self._failed() is not None:
                raise self._failed()

    def __enter__(self) -> "CheckPool":
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()
        for fd in self._outputs.values():
            os.close(fd)
        self._outputs.clear()

    def _output(self, path: Path) -> int:
        with self._cond:
            if path not in self._outputs:
                self._outputs[path] = os.open(path, os.O_WRONLY)
            return self._outputs[path]

    def _run(self, check: FileRangeCheck) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._jobs and not self._errors)
                if self._stop:
                    return
                number, args, whole, into = self._jobs.popleft()
                self._running += 1
            error = None
            try:
                if into is None:
                    check.check(*args, whole=whole)
                else:
                    fd = self._output(into[0])
                    check.copy(*args, _WriteAt(fd, into[1]), whole=whole)
                    # start writing them to disk now, not once the kernel's dirty-page threshold is reached (GBs
                    # later): the disk then writes from the first tensor on, and little is left for the final sync
                    os.posix_fadvise(fd, into[1], args[4], os.POSIX_FADV_DONTNEED)
            except BaseException as e:  # handed to the converter's thread, which raises it
                error = e
            with self._cond:
                self._running -= 1
                self._pending -= args[4]
                if error is not None:
                    self._errors[number] = error
                self._cond.notify_all()


def refuse_nonfinite_model(model: torch.nn.Module, where: str) -> None:
    """Collective when a process group is up: NaN/Inf weights make every loss and statistic NaN, so a loaded model
    holding any is refused, naming the first such parameter, on every rank alike (a rank holding none must not wait
    for one that raised)."""
    import torch.distributed as dist

    local = next((str(e) for name, p in model.named_parameters()
                  if (e := nonfinite_error(where, name, p.detach())) is not None), None)
    found: list[str | None] = [local]
    if dist.is_available() and dist.is_initialized():
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, local)
    error = next((e for e in found if e is not None), None)
    if error is not None:
        raise CheckpointError(error)
