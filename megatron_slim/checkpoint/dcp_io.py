"""Megatron-Core torch_dist checkpoints written and read tensor by tensor, without building the model in memory.

A torch_dist checkpoint is a PyTorch DCP checkpoint whose keys are megatron-core's global sharded keys, plus
megatron's `metadata.json` and common state (`checkpoint/layout.py` says which keys and shapes a model needs):
- write: a DCP save whose planner resolves each tensor lazily (`produce(key)`) at the moment the single-threaded
  writer streams it to disk, in plan order, so memory holds one group of tensors at a time; the sharded objects
  come last, named only then (so the layout can still be in the making while tensors stream);
- read: a tensor stored whole in one item (every tensor we write) is torch.load'ed straight from its byte range;
  others (e.g. a checkpoint saved sharded by megatron-core) go through a DCP load of just the requested keys.
Any megatron-core model at any TP/PP/EP layout then loads these files (DCP reshards on read).
"""
from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _write_item
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed.checkpoint.utils import _create_file_view
from torch.futures import Future
from torch.utils.serialization import config as serialization_config

from megatron_slim.checkpoint.readahead import advise_willneed
from megatron_slim.checkpoint.safe_metadata import SafeFileSystemReader
from megatron_slim.checkpoint.splice import Splices, SpliceStream


class _LazyPlanner(DefaultSavePlanner):
    """Resolves tensor data only when the writer asks for it."""

    def __init__(self, produce: Callable[[str], torch.Tensor]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._produce = produce

    def resolve_data(self, write_item):
        key = write_item.index.fqn
        tensor = self._produce(key)
        want = write_item.tensor_data.size
        if tuple(tensor.shape) != tuple(want):
            raise ValueError(f"{key}: produced shape {tuple(tensor.shape)}, checkpoint expects {tuple(want)}")
        tensor = tensor.detach().contiguous()
        # torch.save writes a tensor's whole storage: give views of larger tensors (e.g. splits) their own
        return tensor.clone() if tensor.untyped_storage().nbytes() != tensor.nbytes else tensor


class _StreamingWriter(FileSystemWriter):
    """FileSystemWriter with one file per rank, minus its memory: torch's writer keeps every tensor of a file
    referenced until the file is closed (for its safetensors variant), i.e. the whole model here. This writes the
    same file (tensors in plan order, each via torch's `_write_item`, then the sharded objects) and drops each
    tensor as soon as it is written. The objects are named by `objects()` only after the last tensor, and added
    to the metadata in `finish`."""

    def __init__(self, path: str, objects: Callable[[], list[str]], splices: Splices | None) -> None:
        super().__init__(path, single_file_per_rank=True, thread_count=1, sync_files=True, overwrite=True)
        self._objects = objects
        self._splices = splices
        self._written_objects: list[str] = []

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        results = []
        with self.fs.create_stream(self.fs.concat_path(self.path, name), "wb") as stream:
            out = stream if self._splices is None else SpliceStream(stream, self._splices)
            for item in plan.items:
                data = planner.resolve_data(item)
                results.append(_write_item(self.transforms, out, data, item, name, self.serialization_format))
                if self._splices is not None:
                    self._splices.check_written(data, item.index.fqn)
            # the tensors go to disk while `objects()` may still wait (for the layout child), not after it
            stream.flush()
            os.fsync(stream.fileno())
            self._written_objects = self._objects()
            # megatron-core stores a sharded object as the torch.save'd list of its shard data (here empty)
            data = io.BytesIO()
            torch.save([None], data)
            for key in self._written_objects:
                item = WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO)
                results.append(_write_item(self.transforms, stream, data, item, name, self.serialization_format))
            stream.flush()
            os.fsync(stream.fileno())
        done: Future[list[WriteResult]] = Future()
        done.set_result(results)
        return done

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        metadata.state_dict_metadata.update({k: BytesStorageMetadata() for k in self._written_objects})
        super().finish(metadata, results)


# megatron-core's files around the DCP data (dist_checkpointing.core.save_config, strategies.common): written
# here so that writing a checkpoint does not import megatron-core (seconds); tests compare them with its own.
MCORE_CONFIG_FILE, MCORE_CONFIG = "metadata.json", {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
MCORE_COMMON_FILE = "common.pt"


def write_checkpoint(out_dir: str | Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                     objects: Callable[[], list[str]], produce: Callable[[str], torch.Tensor],
                     splices: Splices | None = None) -> None:
    """Stream `entries` (in this order) into a torch_dist checkpoint; `produce(key)` returns each tensor's data,
    `objects()` (called after the last tensor) the model's sharded-object keys; tensors `produce` registered in
    `splices` are copied from their source files. Errors raised by `produce` or `objects` come out as they are,
    not wrapped in DCP's CheckpointException."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state: dict[str, object] = {k: torch.empty(shape, dtype=dtype, device="meta") for k, shape, dtype in entries}
    # torch.save's per-record CRC32 costs about a third of serialising a tensor, and torch.load never checks it
    try:
        with serialization_config.patch({"save.compute_crc32": False}):
            dcp.save(state, storage_writer=_StreamingWriter(str(out), objects, splices),
                     planner=_LazyPlanner(produce), no_dist=True)
    except CheckpointException as e:
        raise next(iter(e.failures.values()))[0] from None
    torch.save({}, out / MCORE_COMMON_FILE)
    (out / MCORE_CONFIG_FILE).write_text(json.dumps(MCORE_CONFIG))


class _CachedReader(SafeFileSystemReader):
    """Reads the DCP metadata once (refusing anything but metadata records), not once per load call."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._metadata = None

    def read_metadata(self):
        if self._metadata is None:
            self._metadata = super().read_metadata()
        return self._metadata


class McoreReader:
    """Reads chosen tensors (full global shape) from a torch_dist checkpoint."""

    def __init__(self, ckpt_dir: str | Path) -> None:
        self.dir = Path(ckpt_dir)
        if not (self.dir / ".metadata").is_file():
            raise FileNotFoundError(f"{ckpt_dir} is not a torch_dist checkpoint (no .metadata)")
        self._reader = _CachedReader(str(self.dir))
        metadata = self._reader.read_metadata()
        md = metadata.state_dict_metadata
        self.tensors = {k: (tuple(m.size), m.properties.dtype) for k, m in md.items() if hasattr(m, "size")}
        # key -> where its one stored item lies, for tensors saved whole and untransformed (read without DCP)
        self._whole = {}
        for k, m in md.items():
            if hasattr(m, "size") and len(m.chunks) == 1 and tuple(m.chunks[0].sizes) == tuple(m.size):
                info = metadata.storage_data.get(MetadataIndex(k, m.chunks[0].offsets))
                if info is not None and not info.transform_descriptors:
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
            archive = torch._C.PyTorchFileReader(_create_file_view(f, info.offset, info.length))
            records = [r for r in archive.get_all_records() if r.startswith("data/")]
            if len(records) != 1 or (archive.has_record("byteorder")
                                     and archive.get_record("byteorder") != sys.byteorder.encode()):
                return None
            at, stored = info.offset + archive.get_record_offset(records[0]), archive.get_record_size(records[0])
            tensor = torch.load(_create_file_view(f, info.offset, info.length), map_location="meta",
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
            dcp.load(rest, storage_reader=self._reader, no_dist=True)
        out.update(rest)
        return [out[k] for k in keys]

    def _load_whole(self, key: str) -> torch.Tensor:
        info = self._whole[key]
        with open(self.dir / info.relative_path, "rb") as f:
            tensor = torch.load(_create_file_view(f, info.offset, info.length), map_location="cpu", weights_only=True)
        tensor = tensor.contiguous()  # as DCP's copy into a fresh tensor would give (transforms use .view)
        shape, dtype = self.tensors[key]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"{self.dir}: {key} is stored as {tensor.dtype}{tuple(tensor.shape)}, its metadata says "
                             f"{dtype}{shape}")
        return tensor
