"""What a model may miss, and what it may leave unread, when it loads a Megatron-Core checkpoint: in one place.

Checkpoints move between kernel backends: converted, pruned or trained on CPU nodes with the torch-native
(local) backend, trained on GPUs with Transformer Engine, evaluated or pruned on CPU again. The two backends
store the same tensors under the same keys (`models/specs.py` maps unfused norms to TE's fused names); they
differ only in `_extra_state`, the per-module state TE keeps beside the weights (FP8 scaling metadata: recipe,
scales, amax history), which megatron-core saves as sharded objects. Every load of model weights (`load_sharded`:
`checkpoint/mcore.load_model`, `train/checkpointing.load`, then `module_state` for the module's own
`load_state_dict(strict=True)`) follows these rules:

1. Every tensor the model asks for must be in the checkpoint, at any TP/PP/EP layout (DCP reshards on read). A
   missing tensor is a CheckpointError naming it.
2. Extra state the checkpoint lacks is given as None, exactly what a checkpoint without FP8 metadata holds (the
   converter writes None for every extra state): TE then keeps the state the module was built with and collects
   new amax history in its first FP8 steps; local modules ignore it. Two cases: an `_extra_state` object the
   model asks for and a CPU-written checkpoint does not have (modules the local backend has without extra
   state, e.g. TE's standalone norms), and extra state megatron-core never puts in a checkpoint although the
   module's `load_state_dict` wants it (`TEDotProductAttention.sharded_state_dict` holds only its learnable
   softmax offset; megatron-LM's `training/checkpointing.py` then retries the whole `load_state_dict`
   with strict=False, which we do not).
3. Extra state present in the checkpoint goes to its module: TE restores it; megatron-core's local linears
   ignore it (their `set_extra_state` is a no-op), so a TE-written checkpoint loads into the local backend.
4. Entries the model does not ask for are left unread: optimizer state of training checkpoints, the extra state
   of TE modules the local backend lacks, an MTP head the model is built without.

Experts have one format for `SequentialMLP` (local backend) and `TEGroupedMLP` (TE's grouped GEMM). What we
rely on, from megatron-core 0.19.2 (`transformer/moe/experts.py`, `extensions/transformer_engine.py`):
`TEGroupedMLP.sharded_state_dict` is documented as "interchangeable with SequentialMLP's", and both emit, per
local expert, `<layer>.mlp.experts.linear_fc{1,2}.weight` with the global expert index prepended as a sharded
axis of length num_experts (EP rank * local experts + local index), fc1 through the same SwiGLU factory, and
each expert's extra state as `experts.linear_fc{1,2}._extra_state` with that same expert offset. A checkpoint
therefore holds each expert stack as one (num_experts, out, in) tensor whichever module wrote it, and loads at
any EP size into either (`tests/test_backend_portable.py` checks the local side and the expert keys of a
TE-style model on CPU; `tests/gpu/` checks TE itself where it is installed).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_slim.errors import CheckpointError

EXTRA_STATE = "_extra_state"


def is_extra_state_key(sharded_key: str) -> bool:
    """`a.b._extra_state` (megatron-core names every module's extra state so, TE's grouped GEMM too)."""
    return sharded_key.rsplit(".", 1)[-1] == EXTRA_STATE


def _leaves(tree: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _leaves(v, (*path, i))
    else:
        yield path, tree


def _set(tree: Any, path: tuple, value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {}) if isinstance(tree, dict) else tree[k]
    tree[path[-1]] = value


def load_sharded(sharded_state_dict: dict, ckpt_dir: str | Path) -> dict:
    """Collective: megatron-core's load of `sharded_state_dict` from `ckpt_dir` (through safe_metadata's checked
    readers) under the rules above; returns the loaded state dict, absent extra state filled with None."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedObject
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from megatron_slim.checkpoint import safe_metadata

    # paths first: megatron-core's load removes what the checkpoint lacks from the dict it is given
    requested = [(path, v) for path, v in _leaves(sharded_state_dict) if isinstance(v, ShardedBase)]
    state, _, absent = safe_metadata.load(sharded_state_dict, ckpt_dir, strict=StrictHandling.RETURN_UNEXPECTED)
    if not absent:
        return state
    missing = sorted({v.key for _, v in requested
                      if v.key in absent and not (isinstance(v, ShardedObject) and is_extra_state_key(v.key))})
    if missing:
        raise CheckpointError(f"{ckpt_dir}: the model needs {len(missing)} tensor(s) the checkpoint does not hold: "
                              f"{missing[:10]}{' ...' if len(missing) > 10 else ''} (was it written for another "
                              "model config?)")
    for path, v in requested:
        if v.key in absent:
            _set(state, path, None)
    return state


def module_state(module: torch.nn.Module, loaded: dict, sharded_keys: set[str]) -> dict:
    """What `module.load_state_dict(strict=True)` gets from a load of its sharded state dict: the entries it asked
    for (a training checkpoint's common entries dropped; TE's per-expert `_extra_state<i>` kept for its merge hook),
    plus None for each extra state the module takes that megatron-core did not ask the checkpoint for."""
    state = {k: v for k, v in loaded.items() if k in sharded_keys}
    for name, m in module.named_modules():
        if type(m).set_extra_state is not torch.nn.Module.set_extra_state:
            state.setdefault(f"{name}.{EXTRA_STATE}" if name else EXTRA_STATE, None)
    return state
