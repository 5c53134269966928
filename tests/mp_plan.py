"""Worker for test_plan.py (module level, so a spawned process can import it): real Megatron-Core parameter counts."""
from __future__ import annotations

from megatron_slim.models.builder import build_model
from megatron_slim.models.config import ModelConfig
from megatron_slim.runtime.distributed import ParallelConfig, init_model_parallel


def parameter_numels(rank: int, world: int, configs: dict[str, ModelConfig]) -> dict[str, dict[str, int]]:
    """{config name: {parameter name: numel}} of the HybridModel built from each config at TP=PP=EP=1."""
    init_model_parallel(ParallelConfig(), seed=0)
    return {name: {n: p.numel() for n, p in build_model(cfg, ParallelConfig()).named_parameters()}
            for name, cfg in configs.items()}
