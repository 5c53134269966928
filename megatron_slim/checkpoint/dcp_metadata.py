"""A torch_dist checkpoint's `.metadata`, unpickled without running code stored in it, and optionally without
importing torch.distributed.checkpoint.

torch's DCP reader `pickle.load`s `<ckpt>/.metadata`; a crafted file could run code. `MetadataUnpickler` admits only
the classes DCP metadata consists of (`ADMITTED`, found by unpickling what torch and megatron-core 0.19.2 write:
model, converter and training checkpoints) and refuses anything else with a CheckpointError naming the file and the
global (`safe_metadata` builds torch's readers on it). `read_records` reads the same file through the same admission
check, each DCP class taken as a plain `Record` of its pickled fields: what a converter needs (names, shapes,
dtypes, where each item lies) without importing torch.distributed.checkpoint, which costs a converter about a
second of start-up (DTensor, sympy, torch.fx).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from megatron_slim.errors import CheckpointError

# module -> names the metadata pickle may reference. Each is a plain record (dataclass/enum/tuple) whose
# construction runs no code beyond storing its fields; `_get_layout` maps a name to a torch.layout.
ADMITTED: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING"}),
    # Metadata.all_local_plans: the save plans DCP keeps next to the metadata
    "torch.distributed.checkpoint.planner": frozenset({
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData"}),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),  # TensorProperties.layout
    "torch": frozenset({"Size"}),  # plus every torch.<dtype>, checked by type below
    "pathlib": frozenset({"PosixPath", "PurePosixPath"}),  # StorageMeta.checkpoint_id as saved by a Path
    "builtins": frozenset({"set", "frozenset"}),
    "collections": frozenset({"OrderedDict"}),
}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata; any global outside ADMITTED is refused (so no callable of the file's choosing
    ever runs), as is any persistent id (the base Unpickler refuses those)."""

    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in ADMITTED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(f"{self._path}: refusing to unpickle global '{module}.{name}': distributed-checkpoint "
                              "metadata holds only torch's metadata records, so this file was not written by "
                              "torch/megatron-core and is not loaded")


_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")


class Record:
    """A DCP metadata object read without its class: the fields it was pickled with, as attributes (an enum member,
    pickled as its class called with its value, keeps that value in `args`; TensorProperties, which pickles a tuple
    (dtype, layout, requires_grad, memory format, pin_memory), keeps it in `state`)."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


# one Record subclass per admitted DCP class, so that records of different classes stay apart (`kind`)
_RECORDS: dict[tuple[str, str], type[Record]] = {
    (module, name): type(name, (Record,), {"kind": name}) for module in _DCP_MODULES for name in ADMITTED[module]}


class RecordUnpickler(MetadataUnpickler):
    """MetadataUnpickler that gives admitted DCP classes as `Record`s (everything else it admits is light)."""

    def find_class(self, module: str, name: str) -> Any:
        record = _RECORDS.get((module, name))
        return record if record is not None else super().find_class(module, name)


def read_records(path: Path) -> Record:
    """The DCP Metadata pickled in `path` as records (see `Record`), its storage entries checked to name files of
    its own directory."""
    try:
        with open(path, "rb") as f:
            metadata = RecordUnpickler(f, str(path)).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, KeyError, IndexError) as e:
        raise CheckpointError(f"{path}: not a readable distributed-checkpoint metadata file ({e})") from None
    if getattr(metadata, "kind", None) != "Metadata":
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not distributed-checkpoint metadata")
    check_storage_paths(metadata, path.parent, path)
    return metadata


def check_storage_paths(metadata: Any, ckpt_dir: Path, where: str | os.PathLike) -> None:
    """Every storage entry names a file of the checkpoint directory itself: DCP joins `relative_path` to the
    directory as it is, so `../../other/__0_0.distcp` (records of admitted classes only) would read another
    checkpoint's tensors into this one."""
    root = os.path.realpath(ckpt_dir)
    inside: dict[str, bool] = {}  # per file named (one or a few for thousands of entries: realpath costs stat calls)
    for index, info in (metadata.storage_data or {}).items():
        rel = getattr(info, "relative_path", None)
        if isinstance(rel, str) and rel not in inside:
            inside[rel] = bool(rel) and not os.path.isabs(rel) and \
                os.path.realpath(os.path.join(root, rel)).startswith(root + os.sep)
        if not isinstance(rel, str) or not inside[rel]:
            raise CheckpointError(f"{where}: the storage entry of {getattr(index, 'fqn', index)} names the file "
                                  f"{rel!r}, which lies outside the checkpoint directory {ckpt_dir}; refusing to read "
                                  "it")
