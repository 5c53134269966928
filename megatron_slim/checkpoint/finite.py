"""Refusing non-finite weights (NaN or Inf) as a converter streams them: a model that holds any computes NaN losses
and statistics ("LM loss nan") far from the cause, so conversion names the first such tensor instead.

Checked tensor by tensor as they are read, never as a second pass over the model: tensors a converter reads into
memory are checked there; tensors whose bytes it copies file to file (`checkpoint.splice`) are read once in chunks
through one reused buffer, from the page cache the read-ahead filled, on a thread of their own (`CheckThread`) while
the converter copies the next ones. `convert --allow-nonfinite` skips it all.
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


class CheckThread:
    """`FileRangeCheck.check` (or `copy`) of byte ranges on a worker thread, in the order submitted, so that a
    converter's checks run on the other core while it copies on. mcore-to-hf submits each tensor the kernel copied
    file to file (to be read back from the page cache and summed: ~0.3 CPU s per GB, the GIL released throughout),
    and each tensor the kernel would copy at half speed (source and destination offsets that differ modulo a page)
    with the place it goes (`into`): the worker copies it while checking it, one read serving both.

    At most `lag` bytes wait to be checked (the copies stay that close ahead, so the bytes to check are still in the
    page cache). The first non-finite tensor found stops the worker; the error is raised by the next `submit` and
    by `finish`, which waits until every range submitted is checked (and copied). A context manager: leaving it, on
    success or on error, stops the thread."""

    def __init__(self, lag: int = 1 << 30) -> None:
        self._check = FileRangeCheck()  # its own buffer: the converter's copies through a check use another
        self._lag = lag
        self._jobs: deque[tuple[tuple, tuple[int, int] | None, tuple[Path, int] | None]] = deque()
        self._outputs: dict[Path, int] = {}  # descriptors of the files copied into
        self._pending = 0  # bytes submitted, not yet checked
        self._error: BaseException | None = None
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="nonfinite-check", daemon=True)
        self._thread.start()

    def submit(self, where: str, name: str, path: Path, start: int, nbytes: int, dtype: torch.dtype,
               whole: tuple[int, int] | None = None, into: tuple[Path, int] | None = None) -> None:
        """Queue `FileRangeCheck.check(where, name, path, start, nbytes, dtype, whole)`, or with `into` (a file and
        an offset in it) its `copy` to there; raise the error of a range checked earlier, if any."""
        if into is None and not dtype.is_floating_point:
            return
        with self._cond:
            self._cond.wait_for(lambda: self._error is not None or self._pending < self._lag)
            if self._error is not None:
                raise self._error
            self._jobs.append(((where, name, path, start, nbytes, dtype), whole, into))
            self._pending += nbytes
            self._cond.notify_all()

    def finish(self) -> None:
        """Wait until every range submitted is checked; raise the first error."""
        with self._cond:
            self._cond.wait_for(lambda: self._error is not None or not self._jobs and not self._pending)
            if self._error is not None:
                raise self._error

    def __enter__(self) -> "CheckThread":
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()
        for fd in self._outputs.values():
            os.close(fd)
        self._outputs.clear()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._jobs)
                if self._stop:
                    return
                args, whole, into = self._jobs.popleft()
            try:
                if into is None:
                    self._check.check(*args, whole=whole)
                else:
                    if into[0] not in self._outputs:
                        self._outputs[into[0]] = os.open(into[0], os.O_WRONLY)
                    self._check.copy(*args, _WriteAt(self._outputs[into[0]], into[1]), whole=whole)
            except BaseException as e:  # handed to the converter's thread, which raises it
                with self._cond:
                    self._error = e
                    self._cond.notify_all()
                return
            with self._cond:
                self._pending -= args[4]
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
