"""Qwen3-Next (`Qwen3NextForCausalLM`): Gated DeltaNet layers interleaved with gated full attention, partial
rotary, zero-centred RMSNorm, MoE with a sigmoid-gated shared expert, optional MTP layers."""
from __future__ import annotations

from typing import Any

from megatron_slim.models.config import ATTENTION, GDN, ModelConfig, UnsupportedModelError
from megatron_slim.models.hf_fields import decoder_fields, partial_rotary, require_values
from megatron_slim.models.qwen3_moe.config import moe_layer_types

NAME = "qwen3_next"
ARCHITECTURE = "Qwen3NextForCausalLM"
_MIXERS = {"linear_attention": GDN, "full_attention": ATTENTION}


def _layer_types(hf: dict[str, Any]) -> list[str]:
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None:  # older configs: every full_attention_interval-th layer is full attention
        interval = hf.get("full_attention_interval", 4)
        types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)]
    unknown = set(types) - set(_MIXERS)
    if unknown or len(types) != n:
        raise UnsupportedModelError(f"{NAME}: unsupported layer_types {sorted(unknown) or types}")
    return [_MIXERS[t] for t in types]


def from_hf(hf: dict[str, Any]) -> ModelConfig:
    require_values(hf, {"hidden_act": ("silu",), "attention_bias": (False,)}, NAME)
    num_experts = hf.get("num_experts", hf.get("num_local_experts"))
    shared = hf.get("shared_expert_intermediate_size", 0) or 0
    return ModelConfig(
        **decoder_fields(hf, NAME),
        rotary_percent=partial_rotary(hf),
        num_experts=num_experts,
        topk=hf["num_experts_per_tok"],
        moe_ffn_hidden_size=hf["moe_intermediate_size"],
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        mixer_types=_layer_types(hf),
        mlp_types=moe_layer_types(hf, num_experts),
        dense_ffn_hidden_size=hf.get("intermediate_size", 0),
        qk_layernorm=True,
        attention_output_gate=True,
        zero_centered_norm=True,
        shared_expert_ffn_hidden_size=shared,
        shared_expert_gate=shared > 0,
        linear_num_key_heads=hf["linear_num_key_heads"],
        linear_num_value_heads=hf["linear_num_value_heads"],
        linear_key_head_dim=hf["linear_key_head_dim"],
        linear_value_head_dim=hf["linear_value_head_dim"],
        linear_conv_kernel_dim=hf["linear_conv_kernel_dim"],
    )


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The HF config describing `cfg` (e.g. after pruning), keeping every field we do not model."""
    from megatron_slim.models.qwen3_moe.config import to_hf as moe_to_hf

    hf = moe_to_hf(cfg)
    names = {v: k for k, v in _MIXERS.items()}
    hf.update(
        architectures=[ARCHITECTURE], model_type="qwen3_next",
        layer_types=[names[t] for t in cfg.mixer_types],
        shared_expert_intermediate_size=cfg.shared_expert_ffn_hidden_size,
        linear_num_key_heads=cfg.linear_num_key_heads, linear_num_value_heads=cfg.linear_num_value_heads,
        linear_key_head_dim=cfg.linear_key_head_dim, linear_value_head_dim=cfg.linear_value_head_dim,
        linear_conv_kernel_dim=cfg.linear_conv_kernel_dim,
    )
    hf.pop("full_attention_interval", None)
    return hf
