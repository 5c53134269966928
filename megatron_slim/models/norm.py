"""Torch RMSNorm for the torch-native (non-Transformer-Engine) layer specs.

megatron-core's `WrappedTorchNorm` refuses sequence parallelism and zero-centred gamma, but MoE with TP > 1
requires sequence parallelism and Qwen3-Next uses zero-centred norms (x_hat * (1 + w)). This norm supports
both. Its weight carries `sequence_parallel`, so megatron-core all-reduces its gradient across the TP group:
with sequence parallelism every TP rank sees different tokens (or different heads, for q/k and GDN output
norms), so the replicated weight's gradient is partial on each rank.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_: object) -> None:
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError(f"megatron-slim's torch norm implements RMSNorm only, got {config.normalization}")
        self.eps = eps
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight.float()
        return (y * (1.0 + w if self.zero_centered_gamma else w)).to(x.dtype)
