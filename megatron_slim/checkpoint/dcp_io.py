"""Megatron-Core torch_dist checkpoints written and read tensor by tensor, without building the model in memory.

A torch_dist checkpoint is a PyTorch DCP checkpoint whose keys are megatron-core's global sharded keys, plus
megatron's `metadata.json` and common state (`checkpoint/layout.py` says which keys and shapes a model needs):
- write: a DCP save whose planner resolves each tensor lazily (`produce(key)`) at the moment the single-threaded
  writer streams it to disk, in plan order, so memory holds one group of tensors at a time; the sharded objects
  come last, named only then (so the layout can still be in the making while tensors stream);
- read: `checkpoint.mcore_reader` (without importing DCP unless a tensor needs it).
Any megatron-core model at any TP/PP/EP layout then loads these files (DCP reshards on read).
"""
from __future__ import annotations

import io
import json
import os
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
from torch.futures import Future
from torch.utils.serialization import config as serialization_config

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
