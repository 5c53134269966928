"""Let megatron-core modules run on CPU under gloo, for tests and the CPU demo only.

megatron-core is CUDA-first. On a machine without a GPU a handful of CUDA-only calls stop it; this module
redirects exactly those, in one place, and is never activated when CUDA is available:

1. Device placement: `torch.cuda.current_device()` and literal `device="cuda"` arguments (rotary embeddings,
   router, pipeline schedules, causal masks) -> a `TorchFunctionMode` rewrites CUDA devices to CPU, and
   `Tensor.cuda()` / `Tensor.to("cuda")` become CPU no-ops.
2. RNG: megatron's CUDA RNG tracker (`tensor_parallel.random`) is backed by the CPU generator, so
   `model_parallel_cuda_manual_seed` and the init/dropout forks work unchanged.
3. Streams and events used by the MoE layer and dispatchers -> no-op stand-ins; `synchronize` -> no-op.
4. Gated DeltaNet: fla's Triton `l2norm` -> a torch equivalent (the recurrence already has a torch path,
   `torch_chunk_gated_delta_rule`, chosen by `deterministic_mode=True`, and the conv has a torch path there too).
   megatron's GDN module imports fla, seconds of start-up, so it is patched when first imported (`patch_gdn`,
   called by the GDN layer spec), not imported here; fla's package is entered without its `__init__`
   (`runtime.fla_package`: ~1.8 CPU-s less per process; GPU runs import fla as it is).
5. Type strings: the optimizers check `param.type() == "torch.cuda.FloatTensor"`; `Tensor.type()` reports the
   CUDA name of CPU tensors.
6. `torch.compile` (megatron's `jit_fuser`) is disabled: inductor compilation on CPU is slow and adds nothing
   to correctness checks.
7. Host memory: freed tensors' pages are kept for reuse (runtime/host_memory.py) instead of being unmapped and
   page-faulted again by the next step's allocations of the same size.

Production paths (GPU) run megatron-core's real CUDA code: `activate()` refuses to run when CUDA is available.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_mode: TorchFunctionMode | None = None
_GDN_COMMON = "megatron.core.ssm.gated_delta_net.common"


def _to_cpu_device(device: Any) -> Any:
    if isinstance(device, torch.device):
        return _CPU if device.type == "cuda" else device
    if isinstance(device, str):
        return _CPU if device.startswith("cuda") else device
    if isinstance(device, int):  # a bare int means a CUDA ordinal to torch
        return _CPU
    return device


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA device arguments of any torch call to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Every torch call of the process passes here (millions in a test's forward passes), so the common case,
        # no device argument, returns after a few identity checks and no copies.
        if func is _TENSOR_CUDA:
            return args[0]
        if func is _TENSOR_TYPE and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if name.count(".") == 1 else name
        if func is _TENSOR_TO and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        if not kwargs:
            return func(*args)
        if "device" in kwargs:
            kwargs = {**kwargs, "device": _to_cpu_device(kwargs["device"])}
        return func(*args, **kwargs)


_TENSOR_CUDA, _TENSOR_TYPE, _TENSOR_TO = torch.Tensor.cuda, torch.Tensor.type, torch.Tensor.to


class _NoOpStream:
    """Stand-in for torch.cuda.Stream/Event: every method is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str):
        return lambda *a, **k: None

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _torch_l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-6, **_: Any) -> torch.Tensor:
    """Same math as fla's l2norm: x / sqrt(sum(x^2) + eps), computed in fp32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(dim=dim, keepdim=True) + eps)).to(x.dtype)


def is_active() -> bool:
    return _mode is not None


def activate() -> None:
    """Install the redirections (idempotent). Raises on machines where CUDA is available."""
    global _mode
    if _mode is not None:
        return
    if torch.cuda.is_available():
        raise RuntimeError("cpu_compat is for CPU-only runs; on GPU megatron-core's CUDA code must run as is")

    from megatron_slim.runtime.host_memory import retain_freed_memory

    if "torch._dynamo" in sys.modules or os.environ.get("TORCH_COMPILE_DISABLE") != "1":
        from torch import _dynamo  # (seconds to import: with TORCH_COMPILE_DISABLE=1 it reads that when imported)

        _dynamo.config.disable = True
    retain_freed_memory()

    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    cuda.Stream = _NoOpStream
    cuda.Event = _NoOpStream
    cuda.current_stream = lambda *a, **k: _NoOpStream()
    cuda.default_stream = lambda *a, **k: _NoOpStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.synchronize = lambda *a, **k: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    from megatron_slim.runtime.fla_package import enter_fla_without_its_init

    enter_fla_without_its_init()
    _mode = _CudaToCpu()
    _mode.__enter__()
    if _GDN_COMMON in sys.modules:  # imported before activation: patch it now, else on import (patch_gdn)
        patch_gdn()


def patch_gdn() -> None:
    """When active, replace fla's Triton l2norm in megatron's (already imported) Gated DeltaNet module."""
    if is_active():
        sys.modules[_GDN_COMMON].l2norm = _torch_l2norm
