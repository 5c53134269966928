"""The record a model family registers: everything the rest of the package needs to know about it.

A family is one folder, `models/<family>/`, whose `__init__.py` builds its `Family` from the folder's HF config
reader and writer (`config.py`), parameter mapping (`weight_mapping.py`) and surgery table
(`surgery_spec.py`); `models/registry.py` registers it. Nothing else names a family.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from megatron_slim.models.config import ModelConfig
from megatron_slim.models.mapping import FamilyMapping
from megatron_slim.models.surgery_spec import SurgerySpec


@dataclass(frozen=True)
class Family:
    name: str  # the `ModelConfig.family` of its configs
    architecture: str  # the HF config's `architectures[0]`
    from_hf: Callable[[dict[str, Any]], ModelConfig]  # HF config -> ModelConfig (errors name what is unsupported)
    to_hf: Callable[[ModelConfig], dict[str, Any]]  # ModelConfig -> HF config (e.g. of a pruned student)
    mapping: FamilyMapping  # HF <-> Megatron-Core parameter names and transforms
    surgery: SurgerySpec  # which dimension of which HF tensor each kind of pruning selects on
    max_mtp_layers: int = 0  # MTP depths its HF layout can hold
    model_type: str | None = None  # the HF config's `model_type`, when it is not `name`

    @property
    def hf_model_type(self) -> str:
        return self.model_type or self.name
