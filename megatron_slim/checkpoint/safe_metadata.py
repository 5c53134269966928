"""Reading Megatron-Core (torch_dist) checkpoints without running code stored in them.

torch's distributed-checkpoint reader `pickle.load`s `<ckpt>/.metadata`, and its default load planner
`torch.load(..., weights_only=False)`s every byte item (megatron-core's sharded objects: `common_state`,
`rng_state`, optimizer groups, `_extra_state`); megatron-core's `load_common` (legacy `common.pt`) relies on
torch.load's default. A crafted checkpoint could run code in any of them. Here:
- `.metadata` goes through `dcp_metadata.MetadataUnpickler`, which admits only the classes DCP metadata consists of
  (`dcp_metadata.ADMITTED`) and refuses anything else with a CheckpointError naming the file and the global;
- every byte item is unpickled first by torch's weights_only unpickler (tensors, numbers, strings, containers),
  so the planner's unrestricted torch.load only ever sees bytes already proven harmless;
- `common.pt` is loaded with weights_only=True.
`SafeFileSystemReader` does the first two for direct DCP reads; `load()` is megatron-core's
`dist_checkpointing.load` with megatron-core's reader factory and `load_common` swapped for these while it runs.
Checkpoints written by megatron-core or by our converter load unchanged, with no opt-in.
"""
from __future__ import annotations

import io
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint.metadata as dcp_metadata
import torch.distributed.checkpoint.planner as dcp_planner
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from megatron_slim.checkpoint.dcp_metadata import MetadataUnpickler, check_storage_paths
from megatron_slim.errors import CheckpointError


def load_metadata(path: str | os.PathLike, stream: Any | None = None) -> dcp_metadata.Metadata:
    """The DCP Metadata pickled in `path` (read from `stream` when given), through MetadataUnpickler."""
    try:
        if stream is None:
            with open(path, "rb") as f:
                metadata = MetadataUnpickler(f, str(path)).load()
        else:
            metadata = MetadataUnpickler(stream, str(path)).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, KeyError, IndexError) as e:
        raise CheckpointError(f"{path}: not a readable distributed-checkpoint metadata file ({e})") from None
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not distributed-checkpoint metadata")
    return metadata


def _refusal(e: pickle.UnpicklingError) -> str:
    """The line of torch's weights_only refusal that names the global (its message is several paragraphs)."""
    parts = [p.strip() for p in str(e).split("\n\n") if p.strip()]
    named = [p for p in parts if "GLOBAL" in p or "Unsupported" in p]
    return (named or parts or [type(e).__name__])[0]


def check_object_bytes(data: bytes, where: str) -> None:
    """Refuse a sharded-object payload unless torch's weights_only unpickler accepts it."""
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{where}: refusing to unpickle this object: {_refusal(e)}") from None
    except (EOFError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{where}: unreadable object ({e})") from None


class _CheckedPlanner:
    """The load planner, except that byte items are vetted by check_object_bytes before it unpickles them."""

    def __init__(self, planner: Any, reader: SafeFileSystemReader) -> None:
        self._planner = planner
        self._reader = reader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        data = value.getvalue()
        with self._reader.recording():
            check_object_bytes(data, f"{self._reader.path}: {read_item.storage_index.fqn}")
        self._planner.load_bytes(read_item, io.BytesIO(data))


class SafeFileSystemReader(FileSystemReader):
    """torch's FileSystemReader with the metadata read by MetadataUnpickler and byte items vetted. DCP catches
    a reader's exceptions (it falls back to rank-local metadata, wraps the rest in CheckpointException), so each
    refusal is also kept in `refusals` for `reporting_refusals` to raise as itself."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self.refusals: list[CheckpointError] = []

    @contextmanager
    def recording(self) -> Iterator[None]:
        try:
            yield
        except CheckpointError as e:
            self.refusals.append(e)
            raise

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.recording(), self.fs.create_stream(path, "rb") as stream:
            metadata = load_metadata(path, stream)
            check_storage_paths(metadata, Path(self.path), path)
        # as FileSystemReader.read_metadata does
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: dcp_planner.LoadPlan, planner: dcp_planner.LoadPlanner):
        return super().read_data(plan, _CheckedPlanner(planner, self))


class CachedSafeReader(SafeFileSystemReader):
    """Reads the metadata once (refusing anything but metadata records), not once per load call."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self._metadata: dcp_metadata.Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


@contextmanager
def reporting_refusals(readers: list[SafeFileSystemReader]) -> Iterator[None]:
    """Whatever DCP or megatron-core made of it, a failure after one of `readers` refused a file comes out as
    that refusal (one line naming the file and the global), not as the wrapper's message."""
    try:
        yield
    except (Exception, CheckpointException):  # torch's CheckpointException is a BaseException
        refusals = [e for r in readers for e in r.refusals]
        if refusals:
            raise refusals[0] from None
        raise


def _safe_load_common(checkpoint_dir: str | Path) -> Any:
    """Stands in for megatron-core's `load_common`: the legacy common.pt, weights only."""
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

    path = Path(checkpoint_dir) / COMMON_STATE_FNAME
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refusing to unpickle: {_refusal(e)}") from None


@contextmanager
def mcore_reads_checked() -> Iterator[None]:
    """While active, megatron-core's dist_checkpointing reads metadata, sharded objects and common.pt through the
    checks above: it builds its readers with `_get_filesystem_reader` and calls `load_common`, looked up in these
    two modules at call time, so both are swapped (one reader kind for all: no MSC, no metadata cache)."""
    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch

    readers: list[SafeFileSystemReader] = []

    def reader(checkpoint_dir: str | Path, cache_metadata: bool = False,
               async_strategy: str = "mcore") -> SafeFileSystemReader:
        readers.append(SafeFileSystemReader(checkpoint_dir))
        return readers[-1]

    saved = (mcore_torch._get_filesystem_reader, serialization._get_filesystem_reader, serialization.load_common)
    mcore_torch._get_filesystem_reader = serialization._get_filesystem_reader = reader
    serialization.load_common = _safe_load_common
    try:
        with reporting_refusals(readers):
            yield
    finally:
        mcore_torch._get_filesystem_reader, serialization._get_filesystem_reader, serialization.load_common = saved


def load(sharded_state_dict: dict, checkpoint_dir: str | Path, **kwargs: Any) -> Any:
    """megatron-core's `dist_checkpointing.load` (same arguments), reading through the checks above."""
    from megatron.core import dist_checkpointing

    with mcore_reads_checked():
        return dist_checkpointing.load(sharded_state_dict, str(checkpoint_dir), **kwargs)
