"""The bare model under its wrappers (megatron-core DDP, Float16Module): the module that owns the layers."""
from __future__ import annotations

import torch


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strips every wrapper that holds its model as `.module`; a bare model is returned as is."""
    while hasattr(model, "module"):
        model = model.module
    return model
