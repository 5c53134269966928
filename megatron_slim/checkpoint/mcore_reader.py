"""Reading chosen tensors of a Megatron-Core torch_dist checkpoint (full global shapes), tensor by tensor.

A tensor stored whole in one item (every tensor the converter writes) is torch.load'ed straight from its byte range,
or located there for a file-to-file copy; the metadata is read as records (`dcp_metadata.read_records`), so this
path never imports torch.distributed.checkpoint (about a second of a converter's start-up). Others (e.g. a
checkpoint saved sharded by megatron-core) go through a DCP load of just the requested keys, which imports it then.
"""
from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import torch

from megatron_slim.checkpoint.dcp_metadata import Record, read_records
from megatron_slim.checkpoint.readahead import advise_willneed
from megatron_slim.errors import CheckpointError


class _FileView(io.RawIOBase):
    """Bytes [offset, offset + length) of an open binary file, as a file of their own (what torch.load and
    PyTorchFileReader read one item from)."""

    def __init__(self, f: io.BufferedReader, offset: int, length: int) -> None:
        super().__init__()
        self._f, self._start, self._end = f, offset, offset + length
        self._pos = offset

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos - self._start

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: self._start, os.SEEK_CUR: self._pos, os.SEEK_END: self._end}[whence]
        self._pos = min(max(base + offset, self._start), self._end)
        return self.tell()

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), self._end - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._pos)
        got = self._f.readinto(view[:n])
        self._pos += got
        return got


def _dtype(properties: Record) -> torch.dtype:
    """TensorProperties' dtype: the first field of the tuple it pickles (older torch pickled its fields by name)."""
    dtype = properties.__dict__.get("dtype") or properties.state[0]
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"tensor properties hold {dtype!r}, not a dtype")
    return dtype


class McoreReader:
    """Reads chosen tensors (full global shape) from a torch_dist checkpoint."""

    def __init__(self, ckpt_dir: str | Path) -> None:
        self.dir = Path(ckpt_dir)
        if not (self.dir / ".metadata").is_file():
            raise FileNotFoundError(f"{ckpt_dir} is not a torch_dist checkpoint (no .metadata)")
        self._reader = None  # DCP's, made when a tensor is not stored whole
        metadata = read_records(self.dir / ".metadata")
        md = {k: m for k, m in metadata.state_dict_metadata.items() if m.kind == "TensorStorageMetadata"}
        self.tensors = {k: (tuple(m.size), _dtype(m.properties)) for k, m in md.items()}
        # key -> where its one stored item lies, for tensors saved whole and untransformed (read without DCP)
        items = {(index.fqn, tuple(index.offset)): info for index, info in metadata.storage_data.items()
                 if getattr(index, "offset", None) is not None}
        self._whole = {}
        for k, m in md.items():
            if len(m.chunks) == 1 and tuple(m.chunks[0].sizes) == tuple(m.size) and not any(m.chunks[0].offsets):
                info = items.get((k, tuple(m.chunks[0].offsets)))
                if info is not None and not getattr(info, "transform_descriptors", None):
                    self._whole[k] = info
        self._tensor_bytes: dict[str, tuple[Path, int, int] | None] = {}

    def meta(self, key: str) -> torch.Tensor:
        shape, dtype = self.tensors[key]
        return torch.empty(shape, dtype=dtype, device="meta")

    def prefetch(self, keys: list[str]) -> None:
        """Start reading `keys` into the page cache in the background (reads of them then overlap other work)."""
        for path, offset, length in self.ranges(keys):
            advise_willneed(path, offset, length)

    def ranges(self, keys: list[str]) -> list[tuple[Path, int, int]]:
        """Where those of `keys` stored whole lie: (file, offset, length) each, for read-ahead."""
        infos = [self._whole[k] for k in keys if k in self._whole]
        return [(self.dir / info.relative_path, info.offset, info.length) for info in infos]

    def tensor_bytes(self, key: str) -> tuple[Path, int, int] | None:
        """Where `key`'s values lie in its file, row-major: (file, offset, length), or None if they do not lie there
        as one run (a tensor stored in pieces or transformed, or saved as a strided view). An item torch.save'd
        whole is a zip archive holding its storage uncompressed as one record; the pickle (loaded on the meta
        device, reading no data) says which part of that storage the tensor is."""
        if key not in self._whole:
            return None
        if key not in self._tensor_bytes:
            self._tensor_bytes[key] = self._locate(key)
        return self._tensor_bytes[key]

    def _locate(self, key: str) -> tuple[Path, int, int] | None:
        info = self._whole[key]
        path = self.dir / info.relative_path
        with open(path, "rb") as f:
            archive = torch._C.PyTorchFileReader(_FileView(f, info.offset, info.length))
            records = [r for r in archive.get_all_records() if r.startswith("data/")]
            if len(records) != 1 or (archive.has_record("byteorder")
                                     and archive.get_record("byteorder") != sys.byteorder.encode()):
                return None
            at, stored = info.offset + archive.get_record_offset(records[0]), archive.get_record_size(records[0])
            tensor = torch.load(_FileView(f, info.offset, info.length), map_location="meta",
                                weights_only=True)
        shape, dtype = self.tensors[key]
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape or tensor.dtype != dtype \
                or not tensor.is_contiguous() \
                or (tensor.storage_offset() + tensor.numel()) * tensor.element_size() > stored:
            return None
        return path, at + tensor.storage_offset() * tensor.element_size(), tensor.nbytes

    def read(self, keys: list[str]) -> list[torch.Tensor]:
        # torch.load of the item's bytes, not DCP's load: that loads the same way and then copies into a
        # preallocated tensor, one more pass over memory and twice the tensor's size at peak
        out = {k: self._load_whole(k) for k in keys if k in self._whole}
        rest = {k: torch.empty(self.tensors[k][0], dtype=self.tensors[k][1]) for k in keys if k not in out}
        if rest:
            import torch.distributed.checkpoint as dcp

            from megatron_slim.checkpoint.safe_metadata import CachedSafeReader

            if self._reader is None:
                self._reader = CachedSafeReader(str(self.dir))
            dcp.load(rest, storage_reader=self._reader, no_dist=True)
        out.update(rest)
        return [out[k] for k in keys]

    def _load_whole(self, key: str) -> torch.Tensor:
        info = self._whole[key]
        with open(self.dir / info.relative_path, "rb") as f:
            tensor = torch.load(_FileView(f, info.offset, info.length), map_location="cpu", weights_only=True)
        tensor = tensor.contiguous()  # as DCP's copy into a fresh tensor would give (transforms use .view)
        shape, dtype = self.tensors[key]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"{self.dir}: {key} is stored as {tensor.dtype}{tuple(tensor.shape)}, its metadata says "
                             f"{dtype}{shape}")
        return tensor
