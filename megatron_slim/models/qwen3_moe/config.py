"""Qwen3-MoE (`Qwen3MoeForCausalLM`): GQA with q/k RMSNorm, softmax top-k router, SwiGLU experts."""
from __future__ import annotations

from typing import Any

from megatron_slim.models.config import ATTENTION, DENSE_MLP, MOE, ModelConfig
from megatron_slim.models.hf_fields import decoder_fields, require_values

NAME = "qwen3_moe"
ARCHITECTURE = "Qwen3MoeForCausalLM"


def moe_layer_types(hf: dict[str, Any], num_experts: int) -> list[str]:
    """transformers' rule: MoE unless listed in mlp_only_layers or off the decoder_sparse_step grid."""
    step = hf.get("decoder_sparse_step", 1)
    dense = set(hf.get("mlp_only_layers") or [])
    return [MOE if (i not in dense and num_experts > 0 and (i + 1) % step == 0) else DENSE_MLP
            for i in range(hf["num_hidden_layers"])]


def from_hf(hf: dict[str, Any]) -> ModelConfig:
    require_values(hf, {"hidden_act": ("silu",), "attention_bias": (False,), "use_sliding_window": (False,)}, NAME)
    n = hf["num_hidden_layers"]
    num_experts = hf.get("num_experts", hf.get("num_local_experts"))
    return ModelConfig(
        **decoder_fields(hf, NAME),
        num_experts=num_experts,
        topk=hf["num_experts_per_tok"],
        moe_ffn_hidden_size=hf["moe_intermediate_size"],
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        mixer_types=[ATTENTION] * n,
        mlp_types=moe_layer_types(hf, num_experts),
        dense_ffn_hidden_size=hf.get("intermediate_size", 0),
        qk_layernorm=True,
    )


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The HF config describing `cfg` (e.g. after pruning), keeping every field we do not model."""
    hf = dict(cfg.hf_config)
    experts_key = "num_experts" if "num_experts" in hf or "num_local_experts" not in hf else "num_local_experts"
    hf.update(
        architectures=[ARCHITECTURE], model_type="qwen3_moe", vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups, head_dim=cfg.head_dim, num_experts_per_tok=cfg.topk,
        moe_intermediate_size=cfg.moe_ffn_hidden_size, norm_topk_prob=cfg.norm_topk_prob,
        tie_word_embeddings=cfg.tie_word_embeddings, decoder_sparse_step=1,
        mlp_only_layers=[i for i, t in enumerate(cfg.mlp_types) if t == DENSE_MLP],
    )
    hf[experts_key] = cfg.num_experts
    if cfg.dense_ffn_hidden_size:
        hf["intermediate_size"] = cfg.dense_ffn_hidden_size
    return hf
