"""Streaming reader and writer for HF safetensors checkpoints (sharded, with model.safetensors.index.json).

Plain file I/O instead of mmap: a converter touches every byte once, and mapped pages would stay resident and
count towards RSS. Every tensor read is checked against its file's size, so a truncated shard is a clear error.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_slim.checkpoint.links import check_inside
from megatron_slim.checkpoint.readahead import advise_willneed
from megatron_slim.checkpoint.splice import Range, Splices
from megatron_slim.errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def _read_header(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated header ({n} bytes announced, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header (not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header, 8 + n


def _read_index(index: Path) -> dict[str, str]:
    """The index's weight map, checked: JSON, and every shard a plain file name inside the checkpoint directory
    (an entry such as `../x.safetensors` or an absolute path would read a file the user did not hand us)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index}: not valid JSON ({e})") from None
    except (KeyError, TypeError):
        raise CheckpointError(f"{index}: no 'weight_map' object") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
    # lexically: each shard a plain file name (whether the file it names resolves inside is `check_inside`'s)
    outside = sorted({f for f in weight_map.values() if os.path.basename(f) != f or f in ("", ".", "..")})
    if outside:
        raise CheckpointError(f"{index}: shards must be files of the checkpoint directory itself, not {outside[:5]}")
    return weight_map


class HFReader:
    """Index of every tensor in an HF checkpoint directory; reads tensors one at a time on demand."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.dir = Path(hf_dir)
        index = self.dir / INDEX
        if index.is_file():
            weight_map = _read_index(index)
            files = sorted(set(weight_map.values()))
        elif (self.dir / SINGLE).is_file():
            weight_map, files = {}, [SINGLE]
        else:
            raise CheckpointError(f"{self.dir}: no {INDEX} or {SINGLE}")
        missing = [f for f in files if not (self.dir / f).is_file()]
        if missing:
            raise CheckpointError(f"{self.dir}: shards named in {INDEX} are missing: {missing}")
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            path = self.dir / name
            check_inside(path, self.dir)  # a hub-cache snapshot's links into its blobs/ are fine
            header, data_start = _read_header(path)
            size = path.stat().st_size
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                try:
                    begin, end = meta["data_offsets"]
                    dtype, shape = meta["dtype"], tuple(meta["shape"])
                except (KeyError, TypeError, ValueError):
                    raise CheckpointError(f"{path}: corrupt safetensors header entry for {key}: {meta!r}") from None
                if data_start + end > size:
                    raise CheckpointError(f"{path}: truncated: tensor {key} ends at byte {data_start + end}, "
                                          f"file has {size}")
                if dtype not in _DTYPES:
                    raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {dtype}")
                self.tensors[key] = TensorInfo(path, _DTYPES[dtype], shape, data_start + begin, end - begin)
        lost = sorted(k for k, f in weight_map.items() if k not in self.tensors)
        if lost:
            raise CheckpointError(f"{self.dir}: tensors listed in {INDEX} are not in their shards: {lost[:10]}")

    def keys(self) -> list[str]:
        return list(self.tensors)

    def meta(self, key: str) -> torch.Tensor:
        """A meta tensor with the stored shape and dtype (for planning without reading)."""
        info = self.tensors[key]
        return torch.empty(info.shape, dtype=info.dtype, device="meta")

    def prefetch(self, keys: list[str]) -> None:
        """Start reading `keys` into the page cache in the background (reads of them then overlap other work)."""
        for path, start, nbytes in self.ranges(keys):
            advise_willneed(path, start, nbytes)

    def ranges(self, keys: list[str]) -> list[tuple[Path, int, int]]:
        """Where `keys` are stored: (file, offset, length) each, for read-ahead."""
        return [(info.file, info.start, info.nbytes) for info in map(self.tensors.__getitem__, keys)]

    def read(self, key: str) -> torch.Tensor:
        info = self.tensors[key]
        out = torch.empty(info.shape, dtype=info.dtype)  # not zero-filled, unlike bytearray
        self.read_into(key, out)
        return out

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Read `key` into `out`, a contiguous CPU tensor of its shape and dtype (e.g. its slot of a larger one)."""
        info = self.tensors[key]
        if tuple(out.shape) != info.shape or out.dtype != info.dtype or not out.is_contiguous():
            raise ValueError(f"{key} is {info.dtype}{info.shape}: cannot read it into {out.dtype}{tuple(out.shape)}"
                             f"{'' if out.is_contiguous() else ' (not contiguous)'}")
        with open(info.file, "rb") as f:
            f.seek(info.start)
            if info.nbytes and f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy())) != info.nbytes:
                raise CheckpointError(f"{info.file}: truncated while reading {key}")


class HFWriter:
    """Writes planned tensors into safetensors shards of at most `shard_bytes`, streaming, plus the index.

    The plan (key, shape, dtype, in order) is fixed up front so each shard's header can be written before its
    data (and `offset(key)` says where each tensor's bytes go); `write(key, tensor)` (or `write_ranges` for a
    tensor whose bytes lie in files, with `splices` given, or `reserve`) must then be called in plan order.
    """

    def __init__(self, out_dir: str | Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]],
                 shard_bytes: int = 5 * 2**30, splices: Splices | None = None) -> None:
        self.dir = Path(out_dir)
        self._splices = splices
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for item in plan:
            nbytes = _nbytes(item[1], item[2])
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(item)
            size += nbytes
        n = len(shards)
        self.files = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._headers: list[bytes] = []
        self._offsets: dict[str, int] = {}  # where each tensor's bytes start in its shard file
        for shard in shards:
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for key, shape, dtype in shard:
                nbytes = _nbytes(shape, dtype)
                header[key] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)
            self._headers.append(struct.pack("<Q", len(blob)) + blob)
            self._offsets |= {key: len(self._headers[-1]) + at["data_offsets"][0]
                              for key, at in header.items() if key != "__metadata__"}
        self._order = [(fi, key, shape, dtype) for fi, s in enumerate(shards) for key, shape, dtype in s]
        self._pos = 0
        self._fh = None
        self._cur = -1

    def offset(self, key: str) -> int:
        """The byte offset in its shard file at which planned tensor `key`'s bytes go."""
        return self._offsets[key]

    def _open(self, fi: int) -> None:
        if self._fh:
            self._fh.close()
        self._fh = open(self.dir / self.files[fi], "wb")
        self._fh.write(self._headers[fi])
        self._cur = fi

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self._next(key, tuple(tensor.shape), tensor.dtype)
        if tensor.numel():
            self._fh.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
        self._pos += 1

    def reserve(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[Path, int]:
        """Leave `key`'s bytes to the caller: the file and offset where they go, to be written there (positioned
        writes, e.g. by another thread) before `close`."""
        self._next(key, shape, dtype)
        self._fh.flush()
        at = self._fh.tell()
        self._fh.seek(at + _nbytes(shape, dtype))
        self._pos += 1
        return self.dir / self.files[self._cur], at

    def write_ranges(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, ranges: list[Range]) -> None:
        """Write `key` as the bytes of `ranges` (file, offset, length; in order), copied file to file by the
        kernel."""
        if self._splices is None:
            raise RuntimeError("HFWriter: write_ranges needs the writer made with `splices`")
        nbytes = _nbytes(shape, dtype)
        if sum(length for _, _, length in ranges) != nbytes:
            raise RuntimeError(f"HFWriter: {key} is {nbytes} bytes, its ranges hold "
                               f"{sum(length for _, _, length in ranges)}")
        self._next(key, shape, dtype)
        self._splices.append(self._fh, ranges)
        self._pos += 1

    def _next(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Check that `key` is the next planned tensor and open its shard."""
        fi, want, want_shape, want_dtype = self._order[self._pos]
        if key != want or shape != tuple(want_shape) or dtype != want_dtype:
            raise RuntimeError(f"HFWriter: expected {want} {want_shape} {want_dtype}, got {key} {shape} {dtype}")
        if fi != self._cur:
            self._open(fi)

    def close(self) -> None:
        if self._pos != len(self._order):
            raise RuntimeError(f"HFWriter: {len(self._order) - self._pos} planned tensors were never written")
        if self._fh:
            self._fh.close()
        if len(self.files) > 1:
            weight_map = {key: self.files[fi] for fi, key, _, _ in self._order}
            total = sum(_nbytes(s, d) for _, _, s, d in self._order)
            (self.dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2))


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()
