"""Megatron-Core torch_dist checkpoints written and read tensor by tensor, without building the model in memory.

A torch_dist checkpoint is a PyTorch DCP checkpoint whose keys are megatron-core's global sharded keys, plus
megatron's `metadata.json` and common state. We learn the expected keys and global shapes from the model built on
the *meta* device (no memory), then:
- write: a DCP save whose planner resolves each tensor lazily (`produce(key)`) at the moment the single-threaded
  writer streams it to disk, in plan order, so memory holds one group of tensors at a time;
- read: DCP loads of just the requested keys.
Any megatron-core model at any TP/PP/EP layout then loads these files (DCP reshards on read).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItemType

from megatron_slim.models.config import ModelConfig


@dataclass(frozen=True)
class McoreLayout:
    tensors: dict[str, tuple[int, ...]]  # global key -> global shape
    objects: list[str]  # unique keys of sharded objects (e.g. `_extra_state`)


def mcore_layout(cfg: ModelConfig) -> McoreLayout:
    """Keys and global shapes of `cfg`'s megatron-core checkpoint, from a meta-device model (needs a process group)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    from megatron_slim.models.builder import BuildOptions, build_model
    from megatron_slim.runtime.distributed import ParallelConfig, init_model_parallel

    parallel = ParallelConfig()
    init_model_parallel(parallel)
    with torch.device("meta"):
        model = build_model(cfg, parallel, BuildOptions(perform_initialization=False, use_cpu_initialization=True))
    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    tensors: dict[str, tuple[int, ...]] = {}
    objects: list[str] = []
    for v in nested_values(sharded):
        if isinstance(v, ShardedTensor):
            shape = tuple(v.global_shape)
            if tensors.setdefault(v.key, shape) != shape:
                raise RuntimeError(f"inconsistent global shapes for {v.key}")
        elif isinstance(v, ShardedObject):
            objects.append(v.unique_key)
    return McoreLayout(tensors, sorted(set(objects)))


class _LazyPlanner(DefaultSavePlanner):
    """Resolves tensor data only when the writer asks for it."""

    def __init__(self, produce: Callable[[str], torch.Tensor]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._produce = produce

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        key = write_item.index.fqn
        tensor = self._produce(key)
        want = write_item.tensor_data.size
        if tuple(tensor.shape) != tuple(want):
            raise ValueError(f"{key}: produced shape {tuple(tensor.shape)}, checkpoint expects {tuple(want)}")
        return tensor.contiguous()


def write_checkpoint(out_dir: str | Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                     objects: list[str], produce: Callable[[str], torch.Tensor]) -> None:
    """Stream `entries` (in this order) into a torch_dist checkpoint; `produce(key)` returns each tensor's data."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state: dict[str, object] = {k: torch.empty(shape, dtype=dtype, device="meta") for k, shape, dtype in entries}
    # megatron-core stores each sharded object as the torch.save'd list of its (here empty) shard data
    state.update({k: [None] for k in objects})
    writer = FileSystemWriter(str(out), single_file_per_rank=True, thread_count=1, sync_files=True, overwrite=True)
    dcp.save(state, storage_writer=writer, planner=_LazyPlanner(produce), no_dist=True)
    torch.save({}, out / COMMON_STATE_FNAME)
    save_config(CheckpointingConfig(sharded_backend="torch_dist"), str(out))


class _CachedReader(FileSystemReader):
    """Reads the DCP metadata once, not once per load call."""

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
        md = self._reader.read_metadata().state_dict_metadata
        self.tensors = {k: (tuple(m.size), m.properties.dtype) for k, m in md.items() if hasattr(m, "size")}

    def meta(self, key: str) -> torch.Tensor:
        shape, dtype = self.tensors[key]
        return torch.empty(shape, dtype=dtype, device="meta")

    def read(self, keys: list[str]) -> list[torch.Tensor]:
        state = {k: torch.empty(self.tensors[k][0], dtype=self.tensors[k][1]) for k in keys}
        dcp.load(state, storage_reader=self._reader, no_dist=True)
        return [state[k] for k in keys]
