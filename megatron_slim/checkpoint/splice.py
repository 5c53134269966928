"""Tensors whose bytes already lie in files, written file to file by the kernel instead of through memory.

Most of hf-to-mcore only moves bytes: an expert stack is its experts' tensors back to back, and most other
tensors are copied as they are. Reading them into memory and writing them out again copies every byte twice
through user space; `copy_file_range` (what `cp` uses) copies once, inside the kernel, and on filesystems that
can, not at all. A spliced tensor is a placeholder of the right shape and dtype, never filled (so it costs no
resident memory), registered with the file ranges that hold its bytes in order. torch.save writes a tensor's
storage with a single `write` of that storage (and, with its CRC32 off, never reads it); `SpliceStream`, the
writer's file, recognises the placeholder's storage by its address and copies the ranges instead. Where the
kernel cannot copy between the two files (another filesystem on an old kernel, some network filesystems) the
ranges are copied through one bounded buffer. A placeholder that torch.save did not write in one
piece is an error, never garbage on disk.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch.utils.serialization import config as serialization_config

from megatron_slim.errors import CheckpointError

Range = tuple[Path, int, int]  # file, offset, length
MIN_SPLICE_BYTES = 4096  # torch.save's own records (pickle, headers) are smaller; tensors worth splicing are larger
_BUFFER_BYTES = 64 << 20  # bounds the memory of copies through user space
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}
_PAGE = os.sysconf("SC_PAGE_SIZE")


def page_aligned(src_offset: int, dst_offset: int) -> bool:
    """Whether the kernel copies bytes from `src_offset` to `dst_offset` page to page: between offsets that differ
    modulo a page it copies at half that speed (0.8 against 0.36 CPU s per GB, measured with copy_file_range)."""
    return (src_offset - dst_offset) % _PAGE == 0


class Splices:
    """Placeholders awaiting their write, by storage address, and the source files' descriptors."""

    def __init__(self) -> None:
        self._pending: dict[int, tuple[torch.Tensor, list[Range]]] = {}
        self._fds: dict[Path, int] = {}
        self.kernel_copy = True  # until the kernel refuses
        self.failure: Exception | None = None
        self._buffer: memoryview | None = None  # for copies through user space, allocated on first need

    def add(self, tensor: torch.Tensor, ranges: list[Range]) -> None:
        """`tensor` (contiguous, owning exactly its storage) is to be written as the bytes of `ranges`."""
        if sum(length for _, _, length in ranges) != tensor.nbytes:
            raise ValueError(f"ranges of {sum(r[2] for r in ranges)} bytes for a tensor of {tensor.nbytes}")
        if tensor.untyped_storage().nbytes() != tensor.nbytes or tensor.nbytes < MIN_SPLICE_BYTES:
            raise ValueError("a spliced tensor must own exactly its storage and be at least "
                             f"{MIN_SPLICE_BYTES} bytes")
        self._pending[tensor.data_ptr()] = (tensor, ranges)

    def check_written(self, tensor: torch.Tensor, name: str) -> None:
        """After torch.save of `tensor`: raise what went wrong while splicing it (torch.save itself would have
        replaced the error with one about its own file position), or that it was not spliced at all."""
        if self.failure is not None:
            raise self.failure
        if tensor.nbytes and tensor.data_ptr() in self._pending:
            raise RuntimeError(f"{name}: torch.save did not write the tensor's storage in one piece, so its bytes "
                               "could not be copied from the source file")

    def take(self, address: int, nbytes: int) -> tuple[torch.Tensor, list[Range]] | None:
        entry = self._pending.get(address)
        if entry is None or entry[0].nbytes != nbytes:
            return None
        return self._pending.pop(address)

    def fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def append(self, raw: BinaryIO, ranges: list[Range]) -> None:
        """Write the bytes of `ranges`, in order, at the end of `raw` (a buffered file open for writing, positioned
        at its end), and leave it positioned after them: copied in the kernel, or through one bounded buffer where
        the kernel cannot copy between the two files."""
        raw.flush()
        start = raw.tell()
        nbytes = sum(length for _, _, length in ranges)
        if self.kernel_copy:
            try:
                self._copy(raw.fileno(), ranges, start)
                raw.seek(start + nbytes)
                return
            except OSError as e:
                if e.errno not in _NO_KERNEL_COPY:
                    raise
                self.kernel_copy = False
                raw.seek(start)  # a partial copy is overwritten below
        if self._buffer is None:
            self._buffer = memoryview(bytearray(_BUFFER_BYTES))
        for path, offset, length in ranges:
            fd = self.fd(path)
            for at in range(offset, offset + length, _BUFFER_BYTES):
                n = min(_BUFFER_BYTES, offset + length - at)
                done = 0
                while done < n:  # a read may return less than asked
                    got = os.preadv(fd, [self._buffer[done:n]], at + done)
                    if got == 0:
                        raise CheckpointError(f"{path}: truncated at byte {at + done}")
                    done += got
                raw.write(self._buffer[:n])

    def _copy(self, dst: int, ranges: list[Range], at: int) -> None:
        for path, offset, length in ranges:
            src, done = self.fd(path), 0
            while done < length:
                n = os.copy_file_range(src, dst, length - done, offset + done, at + done)
                if n == 0:
                    raise CheckpointError(f"{path}: truncated at byte {offset + done}")
                done += n
            at += length

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._pending.clear()


class SpliceStream:
    """A binary file for writing that copies registered placeholders' bytes from their source ranges."""

    def __init__(self, raw: BinaryIO, splices: Splices) -> None:
        self._raw = raw
        self._splices = splices

    def write(self, b) -> int:
        view = memoryview(b)
        if view.nbytes >= MIN_SPLICE_BYTES and view.c_contiguous:
            entry = self._splices.take(np.frombuffer(view, dtype=np.uint8).ctypes.data, view.nbytes)
            if entry is not None:
                try:
                    self._splice(*entry)
                except Exception as e:  # raised by check_written once torch.save returns
                    self._splices.failure = self._splices.failure or e
                return view.nbytes
        return self._raw.write(view)

    def _splice(self, tensor: torch.Tensor, ranges: list[Range]) -> None:
        if serialization_config.save.compute_crc32:
            raise RuntimeError("spliced tensors need torch.save's CRC32 off: their bytes are never in memory")
        self._splices.append(self._raw, ranges)

    def tell(self) -> int:
        return self._raw.tell()

    def flush(self) -> None:
        self._raw.flush()

    def fileno(self) -> int:
        return self._raw.fileno()
