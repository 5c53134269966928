"""Atomic, resumable training checkpoints (megatron-core distributed checkpoints).

Layout: <save_dir>/iter_0000100/ (model + optimizer + scheduler + step + RNG, plus model_config.json so every
tool can read it as a model checkpoint) and <save_dir>/latest (the step of the newest complete checkpoint).
A save writes into iter_XXXXXXX.tmp and is renamed only after every rank finished; `latest` is replaced with
runtime.outputs.atomic_write afterwards. A crash (even kill -9) mid-save leaves `latest` pointing at the previous
complete checkpoint; stale .tmp directories are removed by the next save.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_slim.checkpoint.files import TOKENIZER_DIR, copy_side_files
from megatron_slim.checkpoint.load_rules import load_sharded, module_state
from megatron_slim.checkpoint.mcore import MODEL_CONFIG
from megatron_slim.errors import UserError
from megatron_slim.models.config import ModelConfig
from megatron_slim.runtime.outputs import atomic_write

LATEST = "latest"


def iter_dir(save_dir: Path, step: int) -> Path:
    return save_dir / f"iter_{step:07d}"


def latest_step(save_dir: str | Path) -> int | None:
    p = Path(save_dir) / LATEST
    if not p.is_file():
        return None
    step = int(p.read_text().strip())
    if not iter_dir(Path(save_dir), step).is_dir():
        raise FileNotFoundError(f"{p} names step {step} but {iter_dir(Path(save_dir), step)} is missing")
    return step


def _rng_object(load: bool = False):
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = None if load else {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states(),
                                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    return ShardedObject("rng_state", state, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


# Optimizer state sharded in the model's parameter space: a run may resume at another TP/PP/EP/DP layout.
_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _sharded_state(model, optimizer, loading: bool) -> dict[str, Any]:
    model_sd = model.sharded_state_dict(metadata=dict(_METADATA))
    return {"model": model_sd,
            "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=loading, metadata=dict(_METADATA)),
            "rng": _rng_object(load=loading)}


def _inner_optimizers(optimizer) -> list:
    return [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]


def _adam_steps(optimizer) -> list[float | None]:
    """Per chained optimizer, torch Adam's update count (its bias correction depends on it)."""
    steps = []
    for inner in _inner_optimizers(optimizer):
        values = {float(s["step"]) for s in inner.state.values() if "step" in s}
        steps.append(values.pop() if len(values) == 1 else None)
    return steps


def _restore_adam_steps(optimizer, steps: list[float | None]) -> None:
    """Without apex/TE, megatron-core 0.19's distributed optimizer restores torch Adam's per-parameter `step` as
    one tensor object shared by all parameters; torch's foreach Adam then increments it once per parameter and the
    bias correction goes wrong after a resume. Give every parameter its own counter with the saved value."""
    for inner, step in zip(_inner_optimizers(optimizer), steps):
        if step is None:
            continue
        for s in inner.state.values():
            if "step" in s:
                s["step"] = torch.tensor(step, dtype=torch.float32)


def save(save_dir: str | Path, step: int, model, optimizer, scheduler, cfg: ModelConfig, extra: dict,
         keep_last: int, tokenizer: Path | None = None) -> Path:
    """Collective. `model` is the unwrapped (non-DDP) module. `tokenizer`: the student checkpoint's tokenizer
    directory, copied in so that every saved step is a complete checkpoint (evaluate's text tasks, export)."""
    from megatron.core import dist_checkpointing

    save_dir = Path(save_dir)
    final = iter_dir(save_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    rank0 = dist.get_rank() == 0
    if rank0:
        save_dir.mkdir(parents=True, exist_ok=True)
        for stale in save_dir.glob("iter_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    state = _sharded_state(model, optimizer, loading=False)
    state.update(step=step, scheduler=scheduler.state_dict(), extra=extra, adam_steps=_adam_steps(optimizer))
    dist_checkpointing.save(state, str(tmp))
    dist.barrier()
    if rank0:
        (tmp / MODEL_CONFIG).write_text(json.dumps(cfg.to_json(), indent=1))
        if tokenizer is not None:
            copy_side_files(tokenizer, tmp / TOKENIZER_DIR)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        atomic_write(save_dir / LATEST, f"{step}\n", fsync=True)
        kept = sorted(save_dir.glob("iter_???????"), key=lambda p: int(p.name[5:]))
        for old in kept[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(save_dir: str | Path, step: int, model, optimizer, scheduler) -> dict:
    """Collective: restore model, optimizer, scheduler and RNG; returns {"step", "extra"}."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    path = iter_dir(Path(save_dir), step)
    # A fresh torch Adam has no per-parameter state ('step', moments) until its first step, and megatron-core's
    # distributed optimizer needs it to build the loading template (without apex/TE): one zero-gradient step
    # creates it; everything it touches is overwritten by the load below.
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        opt._init_optimizer_states_with_dummy_values()
    sharded = _sharded_state(model, optimizer, loading=True)
    model_keys = set(sharded["model"])
    state = load_sharded(sharded, path)
    model.load_state_dict(module_state(model, state["model"], model_keys), strict=True)
    with torch.no_grad():  # fp32 models: the optimizer's main params are views of the (grad-requiring) weights
        try:
            optimizer.load_state_dict(state["optimizer"])
        except KeyError as e:  # megatron-core matches parameter groups by their hyper-parameters
            raise UserError(f"cannot resume from {path}: its optimizer parameter groups (lr, min_lr, weight decay, "
                            f"...) differ from this run's ({e}); resume with the config it was saved with, or "
                            "train into a new checkpoint.save_dir") from None
        _restore_adam_steps(optimizer, state["adam_steps"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    if isinstance(rng, list):
        rng = rng[0]
    if rng is not None:
        torch.set_rng_state(rng["cpu"])
        get_cuda_rng_tracker().set_states(rng["tracker"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return {"step": state["step"], "extra": state["extra"]}
