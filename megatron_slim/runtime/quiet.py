"""Silence upstream chatter that users can do nothing about (deprecations inside torch and megatron-core, notes
meant for megatron-core's own developers), so that our progress lines and errors stay readable. Everything else
is shown. MEGATRON_SLIM_ALL_WARNINGS=1 shows these too."""
from __future__ import annotations

import logging
import os
import re
import warnings

# starts of warnings.warn messages, with where they come from
_WARNINGS = (
    "The argument order of load has been changed",  # torch DCP, called by megatron-core
    "torch.distributed is disabled, unavailable or uninitialized",  # torch DCP in single-process checkpoint I/O
    "Please use DTensor instead and we are deprecating ShardedTensor",  # megatron-core's sharded state dicts
    "The .grad attribute of a Tensor that is not a leaf Tensor",  # megatron-core's DDP hooks
    "`torch.distributed.reduce_scatter_tensor` is deprecated",  # megatron-core's distributed optimizer
    "`torch.distributed.all_gather_into_tensor` is deprecated",
    "MimoModelConfig is experimental",  # imported by megatron-core's package, never used here
    "Transformer Engine and Apex are not installed",  # `megatron-slim info` reports what is installed
    "Apex is not installed. Falling back to Torch Norm",
    "absl.logging is not installed",
    "full scope is deprecated",  # megatron-core's own TransformerConfig default (we use no CUDA graphs)
    "Triton is not supported on current platform",  # fla on a CPU machine (its Triton kernels are not used)
)
_LOG_MESSAGES = (
    "load_common is deprecated",  # megatron-core's own torch_dist loader
    "DistributedDataParallel: full_param_layout not provided",
    # megatron-core's dist_checkpointing.save into a non-empty directory: ours are fresh runtime.outputs staging
    # directories holding only their marker (a stale one is removed before it is reused)
    "Overwriting old incomplete / corrupted checkpoint",
    # torch.utils.cpp_extension on a CPU machine that has a CUDA toolkit (nvcc) but no GPU, imported by
    # megatron-core's tensor_parallel.random; nothing here compiles extensions
    "No CUDA runtime is found",
)


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_LOG_MESSAGES)


def silence_upstream_noise() -> None:
    """Idempotent; call once per process (the CLI and each spawned rank)."""
    if os.environ.get("MEGATRON_SLIM_ALL_WARNINGS") == "1":
        return
    for message in _WARNINGS:
        warnings.filterwarnings("ignore", message=".*" + re.escape(message))
    drop = _DropMessages()
    for name in ("megatron.core.dist_checkpointing.strategies.common",
                 "megatron.core.distributed.distributed_data_parallel", "torch.utils.cpp_extension"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(drop)
