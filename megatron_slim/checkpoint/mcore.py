"""Megatron-Core distributed checkpoints of a model: saved at one TP/PP/EP layout, loadable at any other.

A checkpoint directory holds megatron-core's torch_dist files plus `model_config.json` (our ModelConfig), so
every tool can rebuild the model without the original HF directory.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from megatron_slim.models.config import ModelConfig, read_json_object
from megatron_slim.models.unwrap import unwrap_model

MODEL_CONFIG = "model_config.json"


def save_model(model: torch.nn.Module, ckpt_dir: str | Path, cfg: ModelConfig) -> None:
    """Collective: every rank saves its shards; rank 0 writes the model config."""
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    if dist.get_rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(unwrap_model(model).sharded_state_dict(), str(ckpt_dir))
    if dist.get_rank() == 0:
        (ckpt_dir / MODEL_CONFIG).write_text(json.dumps(cfg.to_json(), indent=1))
    dist.barrier()


def load_model(model: torch.nn.Module, ckpt_dir: str | Path, keep: Callable[[str], bool] | None = None,
               allow_nonfinite: bool = False) -> None:
    """Collective: load this rank's shards of every parameter, under `checkpoint/load_rules.py`'s rules (a missing
    tensor is an error; extra state may come from either kernel backend or be absent; entries the model does not
    ask for, e.g. optimizer state or a teacher's MTP head when it is built without one, are left unread).
    `keep(key)` true: the model's own value of that sharded key stays, unread (e.g. fresh MTP depths).
    Weights holding NaN/Inf are refused (`checkpoint.finite`) unless `allow_nonfinite`."""
    from megatron_slim.checkpoint.load_rules import load_sharded, module_state

    inner = unwrap_model(model)
    sharded = inner.sharded_state_dict()
    if keep is not None:
        sharded = {k: v for k, v in sharded.items() if not keep(k)}
    keys = set(sharded)
    inner.load_state_dict(module_state(inner, load_sharded(sharded, ckpt_dir), keys), strict=keep is None)
    if not allow_nonfinite:
        from megatron_slim.checkpoint.finite import refuse_nonfinite_model

        refuse_nonfinite_model(inner, str(ckpt_dir))


def load_model_config(ckpt_dir: str | Path) -> ModelConfig:
    p = Path(ckpt_dir) / MODEL_CONFIG
    if not p.is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a megatron-slim checkpoint (no {MODEL_CONFIG})")
    return ModelConfig.from_json(read_json_object(p), str(p))
