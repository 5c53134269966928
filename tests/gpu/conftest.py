"""GPU checks (`pytest -m gpu tests/gpu`; scripts/gpu_check.sh runs them with the GPU image's torch plus carried
wheels). Every test module here is marked `gpu` and skipped where CUDA is not available. Figures the checks
measure are collected in `figures` and written as one JSON object to the path in $GPU_CHECK_JSON (if set)."""
from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def figures() -> Iterator[dict]:
    out: dict = {}
    yield out
    path = os.environ.get("GPU_CHECK_JSON")
    if path and torch.cuda.is_available():
        out["device"] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                         "cuda": torch.version.cuda, "python": platform.python_version(),
                         "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        Path(path).write_text(json.dumps(out, indent=1, sort_keys=True))


@pytest.fixture(scope="session")
def cuda_model_parallel() -> None:
    """One NCCL process group (this process) and megatron-core's parallel state, for every check."""
    from megatron_slim.runtime.distributed import init_model_parallel
    from megatron_slim.runtime.layout import ParallelLayout

    init_model_parallel(ParallelLayout(), seed=1)
