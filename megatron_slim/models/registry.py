"""HF architecture name -> family parser. Adding a family means adding a folder and one line here."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from megatron_slim.models.config import ModelConfig, UnsupportedModelError, load_hf_config
from megatron_slim.models.mixtral.config import from_hf as mixtral_from_hf
from megatron_slim.models.qwen3_moe.config import from_hf as qwen3_moe_from_hf
from megatron_slim.models.qwen3_next.config import from_hf as qwen3_next_from_hf

PARSERS: dict[str, Callable[[dict[str, Any]], ModelConfig]] = {
    "Qwen3MoeForCausalLM": qwen3_moe_from_hf,
    "Qwen3NextForCausalLM": qwen3_next_from_hf,
    "MixtralForCausalLM": mixtral_from_hf,
}


def model_config_from_hf(hf: dict[str, Any] | str | Path, mtp_num_layers: int = 0) -> ModelConfig:
    """Parse an HF config (dict, config.json or checkpoint dir) into a ModelConfig; errors name what is unsupported."""
    if not isinstance(hf, dict):
        hf = load_hf_config(hf)
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in PARSERS:
        raise UnsupportedModelError(
            f"unsupported architecture {archs or hf.get('model_type')!r}; supported: {sorted(PARSERS)}")
    cfg = PARSERS[archs[0]](hf)
    if mtp_num_layers:
        if cfg.family != "qwen3_next":
            raise UnsupportedModelError(f"MTP layers are only supported for Qwen3-Next, not {cfg.family}")
        cfg = cfg.replace(mtp_num_layers=mtp_num_layers)
    return cfg
