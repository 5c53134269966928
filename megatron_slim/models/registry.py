"""Per family: HF config parser, HF config writer and parameter mapping. A new family is a folder + one entry."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from megatron_slim.checkpoint.mapping import FamilyMapping
from megatron_slim.models.config import ModelConfig, UnsupportedModelError, load_hf_config
from megatron_slim.models.mixtral import config as mixtral_config, state_dict_adapter as mixtral_map
from megatron_slim.models.qwen3_moe import config as qwen3_moe_config, state_dict_adapter as qwen3_moe_map
from megatron_slim.models.qwen3_next import config as qwen3_next_config, state_dict_adapter as qwen3_next_map


@dataclass(frozen=True)
class Family:
    architecture: str
    from_hf: Callable[[dict[str, Any]], ModelConfig]
    to_hf: Callable[[ModelConfig], dict[str, Any]]
    mapping: FamilyMapping
    max_mtp_layers: int = 0


FAMILIES: dict[str, Family] = {
    "qwen3_moe": Family("Qwen3MoeForCausalLM", qwen3_moe_config.from_hf, qwen3_moe_config.to_hf, qwen3_moe_map.MAPPING),
    # The HF Qwen3-Next layout has one set of MTP fc/norm tensors, so one MTP depth.
    "qwen3_next": Family("Qwen3NextForCausalLM", qwen3_next_config.from_hf, qwen3_next_config.to_hf,
                         qwen3_next_map.MAPPING, max_mtp_layers=1),
    "mixtral": Family("MixtralForCausalLM", mixtral_config.from_hf, mixtral_config.to_hf, mixtral_map.MAPPING),
}
_BY_ARCH = {f.architecture: f for f in FAMILIES.values()}


def family_of_hf(hf: dict[str, Any]) -> Family:
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in _BY_ARCH:
        raise UnsupportedModelError(
            f"unsupported architecture {archs or hf.get('model_type')!r}; supported: {sorted(_BY_ARCH)}")
    return _BY_ARCH[archs[0]]


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
