"""The registered model families, by name (`ModelConfig.family`) and HF architecture.

A family is one folder (`models/<family>/`, whose `__init__.py` builds its `Family` record) and one entry in
`BUILTIN`; everything else (conversion, pruning, accounting) asks the record found here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_slim.models import mixtral, qwen3_moe, qwen3_next
from megatron_slim.models.config import ModelConfig, UnsupportedModelError, load_hf_config
from megatron_slim.models.family import Family

BUILTIN: tuple[Family, ...] = (qwen3_moe.FAMILY, qwen3_next.FAMILY, mixtral.FAMILY)
FAMILIES: dict[str, Family] = {}


def register(family: Family) -> None:
    """Make `family` known to every tool; a name or architecture is registered once."""
    taken = [f.name for f in FAMILIES.values() if family.name == f.name or family.architecture == f.architecture]
    if taken:
        raise ValueError(f"family {family.name!r} ({family.architecture}) clashes with the registered {taken[0]!r}")
    FAMILIES[family.name] = family


for _family in BUILTIN:
    register(_family)


def family_of_hf(hf: dict[str, Any]) -> Family:
    """The family of an HF config, by its `architectures`; its `model_type` must name the same family (a config
    edited by hand or assembled from two models would otherwise be read as whichever the architecture says)."""
    by_arch = {f.architecture: f for f in FAMILIES.values()}
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in by_arch:
        raise UnsupportedModelError(
            f"unsupported architecture {archs or hf.get('model_type')!r}; supported: {sorted(by_arch)}")
    family = by_arch[archs[0]]
    model_type = hf.get("model_type")
    if model_type is not None and model_type != family.hf_model_type:
        raise UnsupportedModelError(f"config.json disagrees with itself: architectures {archs} is model_type "
                                    f"{family.hf_model_type!r}, but model_type is {model_type!r}")
    return family


def model_config_from_hf(hf: dict[str, Any] | str | Path, mtp_num_layers: int = 0) -> ModelConfig:
    """Parse an HF config (dict, config.json or checkpoint dir) into a ModelConfig; errors name what is unsupported."""
    if not isinstance(hf, dict):
        hf = load_hf_config(hf)
    family = family_of_hf(hf)
    cfg = family.from_hf(hf)
    if mtp_num_layers > family.max_mtp_layers:
        raise UnsupportedModelError(f"{cfg.family}: {mtp_num_layers} MTP layers requested, the HF layout of this "
                                    f"family holds at most {family.max_mtp_layers}")
    return cfg.replace(mtp_num_layers=mtp_num_layers) if mtp_num_layers else cfg


def hf_config_from(cfg: ModelConfig) -> dict[str, Any]:
    return FAMILIES[cfg.family].to_hf(cfg)
