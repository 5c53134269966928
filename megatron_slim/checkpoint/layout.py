"""What a model's Megatron-Core checkpoint must contain: keys, global shapes and sharded objects.

Writers check every planned tensor against it, so a mapping or surgery bug, or a config that does not match the
weights, is an error instead of a checkpoint that fails to load later. It is learnt from the model megatron-core
builds on the *meta* device (no memory). That costs importing megatron-core (and fla) and building the model:
about 10 s of CPU, as long as streaming a few GB. `LayoutCheck` therefore computes it in a child process while the
writer streams tensors, and checks the plan as soon as it arrives; `python -m megatron_slim.checkpoint.layout`
is that child. Given an HF directory instead of a config, the child derives the config itself, so that a converter
can start it before importing torch (seconds more of overlap). This module imports torch only in the child.

The child never outlives its parent: on Linux it asks the kernel for SIGTERM when the parent dies (SIGKILL
included, where no cleanup of the parent's runs), checks that the parent it was started by is still there (it may
have died before that request), and on SIGTERM removes the temporary directory it shares with the parent.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from megatron_slim.errors import CheckpointError
from megatron_slim.models.config import ModelConfig
from megatron_slim.runtime.fla_package import enter_fla_without_its_init
from megatron_slim.runtime.launch_env import without_launcher_env
from megatron_slim.runtime.lifetime import die_with_parent


@dataclass(frozen=True)
class McoreLayout:
    tensors: dict[str, tuple[int, ...]]  # global key -> global shape
    objects: list[str]  # unique keys of sharded objects (e.g. `_extra_state`)

    def check_shape(self, key: str, shape: tuple[int, ...], source: str) -> None:
        """A tensor about to be written must have the global shape the model config implies."""
        want = self.tensors.get(key)
        if want is not None and tuple(shape) != want:
            raise CheckpointError(f"{source}: config/weight shape mismatch: {key} would be {tuple(shape)}, "
                                  f"the config implies {want}")

    def check_complete(self, keys: set[str] | dict) -> None:
        """The planned tensors are exactly the model's: nothing extra, nothing unfilled."""
        extra, missing = sorted(set(keys) - set(self.tensors)), sorted(set(self.tensors) - set(keys))
        if extra or missing:
            raise CheckpointError(f"planned tensors do not match the model: unexpected {extra[:10]}, "
                                  f"unfilled {missing[:10]}")

    def to_json(self) -> dict:
        return {"tensors": {k: list(v) for k, v in self.tensors.items()}, "objects": self.objects}

    @classmethod
    def from_json(cls, d: dict) -> "McoreLayout":
        return cls({k: tuple(v) for k, v in d["tensors"].items()}, list(d["objects"]))


def mcore_layout(cfg: ModelConfig) -> McoreLayout:
    """Keys and global shapes of `cfg`'s megatron-core checkpoint, from a meta-device model (needs a process group)."""
    import torch
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    from megatron_slim.models.builder import BuildOptions, build_model
    from megatron_slim.runtime.distributed import init_model_parallel
    from megatron_slim.runtime.layout import ParallelLayout

    parallel = ParallelLayout()
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


class LayoutJob:
    """`mcore_layout` of a model computed by a child process: of `model`, a ModelConfig, or of the model config an
    HF checkpoint directory implies (derived there as `convert hf-to-mcore` derives it). A context manager that
    kills the child if left early."""

    def __init__(self, model: ModelConfig | Path) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="megatron-slim-layout-")
        d = Path(self._dir.name)
        source = {"hf_dir": str(model)} if isinstance(model, Path) else {"model_config": model.to_json()}
        (d / "source.json").write_text(json.dumps(source))
        env = without_launcher_env()  # a lone process whatever launched its parent: its process group has one rank
        env["TORCH_COMPILE_DISABLE"] = "1"  # it compiles nothing (see `_structure_only`)
        self._log = open(d / "log", "wb")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "megatron_slim.checkpoint.layout", str(d / "source.json"), str(d / "layout.json"),
             str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._result: tuple[McoreLayout, dict] | None = None

    def done(self) -> bool:
        return self._proc.poll() is not None

    def result(self) -> tuple[McoreLayout, dict]:
        """Wait for the child: the layout and the model config (JSON) it is for. The child's output (last lines)
        is in the error if it failed."""
        if self._result is None:
            rc = self._proc.wait()
            self._log.close()
            d = Path(self._dir.name)
            if rc != 0:
                tail = (d / "log").read_text(errors="replace").strip().splitlines()[-30:]
                raise RuntimeError(f"building the Megatron-Core model to learn its checkpoint layout failed "
                                   f"(exit {rc}):\n" + "\n".join(tail))
            out = json.loads((d / "layout.json").read_text())
            self._result = McoreLayout.from_json(out["layout"]), out["model_config"]
        return self._result

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._log.close()
        self._dir.cleanup()

    def __enter__(self) -> "LayoutJob":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LayoutCheck:
    """A planned checkpoint (key -> shape, with where each tensor comes from) checked against `cfg`'s layout.
    The layout comes from `job` (a child already started for this model), else from a new child, or, in a process
    that has imported megatron-core already (a run, a test), from the model built here (a child would import it
    all again). `poll()` checks once the layout is there (writers call it between tensors, so a mismatch stops
    them within seconds); `objects()` waits for it and returns the sharded objects."""

    def __init__(self, cfg: ModelConfig, job: LayoutJob | None = None) -> None:
        self._cfg = cfg
        self._job = job
        self._layout: McoreLayout | None = None
        if job is None:
            if "megatron.core" in sys.modules:
                self._layout = mcore_layout(cfg)
            else:
                self._job = LayoutJob(cfg)
        self._planned: dict[str, tuple[tuple[int, ...], str]] = {}
        self._objects: list[str] | None = None

    def plan(self, key: str, shape: tuple[int, ...], source: str) -> None:
        self._planned[key] = (tuple(shape), source)

    def poll(self) -> None:
        if self._objects is None and (self._job is None or self._job.done()):
            self.objects()

    def objects(self) -> list[str]:
        if self._objects is None:
            layout = self._layout or self._from_job()
            for key, (shape, source) in self._planned.items():
                layout.check_shape(key, shape, source)
            layout.check_complete(self._planned)
            self._objects = layout.objects
        return self._objects

    def _from_job(self) -> McoreLayout:
        layout, model_config = self._job.result()
        if model_config != json.loads(json.dumps(self._cfg.to_json())):  # as the child's JSON reads back
            raise RuntimeError(f"the layout child derived another model config than this process:\n"
                               f"{model_config}\nvs\n{self._cfg.to_json()}")
        return layout

    def __enter__(self) -> "LayoutCheck":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._job is not None:
            self._job.close()


def _die_with_parent(parent: int, workdir: Path) -> None:
    """SIGTERM (from the kernel when `parent` dies, or from anyone) removes `workdir` and ends this process."""
    def terminate(signum: int, frame: object) -> None:
        shutil.rmtree(workdir, ignore_errors=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    die_with_parent(parent, signal.SIGTERM)


def _structure_only() -> None:
    """Import megatron-core for building a model on the meta device and running none of it: its import, and fla's,
    sets up running, about half of the child's CPU time (tiny models: Qwen3-MoE 8.2 -> 4.6 CPU-s, Qwen3-Next
    12.6 -> 6.9), none of which changes a key, shape or sharded object:
    - `torch.compile` wrappers made at import (megatron's `jit_fuser`, fla's kernels) import dynamo and inductor:
      the functions stay plain (and `TORCH_COMPILE_DISABLE`, set by `LayoutJob`, keeps cpu_compat from importing
      dynamo to switch compilation off);
    - wandb, which megatron's timers import if installed: nothing is logged;
    - fla's package `__init__` (runtime/fla_package.py).
    Only for this process: a run or test that builds its model keeps megatron-core's compiled functions and
    wandb."""
    import torch

    def plain(model: object = None, **_: object) -> object:
        return model if model is not None else (lambda fn: fn)

    torch.compile = plain
    sys.modules.setdefault("wandb", None)  # `import wandb` raises ImportError, which megatron's timers expect
    enter_fla_without_its_init()  # fla's layers and models (and transformers) unimported: a meta build runs no kernel


def _main(source_path: str, out_path: str, parent: str) -> None:
    _die_with_parent(int(parent), Path(source_path).parent)
    _structure_only()
    from megatron_slim.runtime.quiet import silence_upstream_noise

    silence_upstream_noise()
    source = json.loads(Path(source_path).read_text())
    if "hf_dir" in source:
        from megatron_slim.checkpoint.source import plan_hf_to_mcore

        cfg = plan_hf_to_mcore(source["hf_dir"])[0]
    else:
        cfg = ModelConfig.from_json(source["model_config"])
    Path(out_path).write_text(json.dumps({"layout": mcore_layout(cfg).to_json(), "model_config": cfg.to_json()}))


if __name__ == "__main__":
    _main(*sys.argv[1:])
