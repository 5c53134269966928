"""Atomic, resumable training checkpoints (megatron-core distributed checkpoints).

Layout: <save_dir>/iter_0000100/ (model + optimizer + scheduler + step + RNG, plus model_config.json so every
tool can read it as a model checkpoint) and <save_dir>/latest (the step of the newest complete checkpoint).
A save writes into iter_XXXXXXX.tmp and is renamed only after every rank finished; `latest` is replaced with
runtime.outputs.atomic_write afterwards. A crash (even kill -9) mid-save leaves `latest` pointing at the previous
complete checkpoint; stale .tmp directories are removed by the next save.

Each checkpoint also carries train_state.json (its step, data position, and whether the loss of the step it was
taken after was finite). Retention keeps the newest `keep_last`, every `keep_every` milestone, and always the newest
checkpoint whose loss was finite, so rotation never deletes the last good state of a diverging run.
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
TRAIN_STATE = "train_state.json"  # in each iter dir: {"step", "finite", ...the trainer's extra}


def iter_dir(save_dir: Path, step: int) -> Path:
    return save_dir / f"iter_{step:07d}"


def latest_step(save_dir: str | Path) -> int | None:
    p = Path(save_dir) / LATEST
    if not p.is_file():
        return None
    text = p.read_bytes()[:4096].decode("ascii", "replace").strip()
    if not text.isdigit():
        raise UserError(f"{p}: expected the number of the latest saved step, got {text[:32]!r}; write the step of "
                        f"an existing {save_dir}/iter_XXXXXXX into it, or remove it to start from step 0")
    step = int(text)
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


def train_state(save_dir: str | Path, step: int) -> dict:
    """A checkpoint's train_state.json ({} for checkpoints written before it existed)."""
    path = iter_dir(Path(save_dir), step) / TRAIN_STATE
    return json.loads(path.read_text()) if path.is_file() else {}


def saved_steps(save_dir: str | Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in Path(save_dir).glob("iter_???????") if p.is_dir())


def last_finite_step(save_dir: str | Path) -> int | None:
    """The newest checkpoint taken after a finite loss (checkpoints without the record count as finite)."""
    good = [s for s in saved_steps(save_dir) if train_state(save_dir, s).get("finite", True)]
    return good[-1] if good else None


def retained(steps: list[int], keep_last: int, keep_every: int, last_finite: int | None) -> set[int]:
    """The checkpoints rotation keeps: the newest keep_last (all when <= 0), the keep_every milestones and the
    newest finite one."""
    keep = set(steps[-keep_last:] if keep_last > 0 else steps)
    keep |= {s for s in steps if keep_every > 0 and s % keep_every == 0}
    if last_finite is not None:
        keep.add(last_finite)
    return keep


def rotate(save_dir: str | Path, keep_last: int, keep_every: int = 0) -> None:
    """Delete the checkpoints `retained` does not keep (rank 0)."""
    steps = saved_steps(save_dir)
    keep = retained(steps, keep_last, keep_every, last_finite_step(save_dir))
    for step in steps:
        if step not in keep:
            shutil.rmtree(iter_dir(Path(save_dir), step), ignore_errors=True)


def async_saving() -> tuple[str, Any]:
    """(strategy, queue) for background saves. NVRx (nvidia-resiliency-ext >= 0.6, megatron-core's default and the
    successor of its own writer) when it is importable, else megatron-core's own writer, deprecated there but
    complete (the registry's newest NVRx, 0.4.1, is below megatron-core's minimum). A request must run in the queue
    of the package that made it, so both come from here."""
    from megatron.core.dist_checkpointing.strategies.nvrx import has_nvrx_async_support

    try:
        nvrx = has_nvrx_async_support()
    except AssertionError:  # importable but older than megatron-core's NVRX_MIN_VERSION
        nvrx = False
    if nvrx:
        from nvidia_resiliency_ext.checkpointing.async_ckpt.core import AsyncCallsQueue
        return "nvrx", AsyncCallsQueue()
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
    return "mcore", AsyncCallsQueue()


def save(save_dir: str | Path, step: int, model, optimizer, scheduler, cfg: ModelConfig, extra: dict,
         keep_last: int, tokenizer: Path | None = None, keep_every: int = 0, finite: bool = True,
         async_queue: tuple[str, Any] | None = None) -> Path:
    """Collective. `model` is the unwrapped (non-DDP) module. `tokenizer`: the student checkpoint's tokenizer
    directory, copied in so that every saved step is a complete checkpoint (evaluate's text tasks, export).
    `finite`: whether the loss of the step just taken was finite (retention keeps the newest such checkpoint).
    `async_queue` (`async_saving()`'s strategy and queue): the tensors are written by a forked process (a copy-on-write
    snapshot of this moment) while training goes on; the rename to iter_XXXXXXX, `latest` and the rotation happen
    when the queue finalizes the save (`maybe_finalize_async_calls`, collective). An earlier save still in flight
    is finalized first, so checkpoints complete in order."""
    from megatron.core import dist_checkpointing

    if async_queue is not None:
        async_queue[1].maybe_finalize_async_calls(blocking=True)
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

    def complete() -> None:
        dist.barrier()
        if rank0:
            (tmp / MODEL_CONFIG).write_text(json.dumps(cfg.to_json(), indent=1))
            (tmp / TRAIN_STATE).write_text(json.dumps({"step": step, "finite": finite} | extra, indent=1))
            if tokenizer is not None:
                copy_side_files(tokenizer, tmp / TOKENIZER_DIR)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            atomic_write(save_dir / LATEST, f"{step}\n", fsync=True)
            rotate(save_dir, keep_last, keep_every)
        dist.barrier()

    if async_queue is None:
        dist_checkpointing.save(state, str(tmp))
        complete()
        return final
    strategy, queue = async_queue
    request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True, async_strategy=strategy)
    request.add_finalize_fn(complete)
    queue.schedule_async_request(request)
    return final


def load(save_dir: str | Path, step: int, model, optimizer, scheduler, allow_nonfinite: bool = False) -> dict:
    """Collective: restore model, optimizer, scheduler and RNG; returns {"step", "extra"}. A step whose weights
    hold NaN/Inf (saved after the loss diverged) is refused unless `allow_nonfinite`: resuming would only
    train on NaN."""
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
    if not allow_nonfinite:
        from megatron_slim.checkpoint.finite import refuse_nonfinite_model

        refuse_nonfinite_model(model, f"{path} (resuming; checkpoint.allow_nonfinite: true resumes anyway)")
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
