"""Mixtral-style MoE (`MixtralForCausalLM`): Llama attention (no q/k norm), softmax top-k router, SwiGLU experts.
Dense Llama-architecture models become this family when upcycled."""
from __future__ import annotations

from typing import Any

from megatron_slim.models.config import ATTENTION, MOE, ModelConfig
from megatron_slim.models.hf_fields import require_values, rope_theta

FAMILY = "mixtral"


def from_hf(hf: dict[str, Any]) -> ModelConfig:
    require_values(hf, {"hidden_act": ("silu",), "sliding_window": (None,), "router_jitter_noise": (0, 0.0),
                        "attention_bias": (False,), "mlp_bias": (False,)}, FAMILY)
    n = hf["num_hidden_layers"]
    return ModelConfig(
        family=FAMILY,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=n,
        num_attention_heads=hf["num_attention_heads"],
        num_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        max_position_embeddings=hf["max_position_embeddings"],
        rope_theta=rope_theta(hf, FAMILY),
        norm_eps=hf["rms_norm_eps"],
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        num_experts=hf["num_local_experts"],
        topk=hf["num_experts_per_tok"],
        moe_ffn_hidden_size=hf["intermediate_size"],
        norm_topk_prob=True,  # Mixtral: softmax over the selected top-k logits
        mixer_types=[ATTENTION] * n,
        mlp_types=[MOE] * n,
        router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.0),
        initializer_range=hf.get("initializer_range", 0.02),
        hf_config=hf,
    )


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The HF config describing `cfg` (e.g. after pruning), keeping every field we do not model."""
    hf = dict(cfg.hf_config)
    hf.update(
        architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups, head_dim=cfg.head_dim, num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.topk, intermediate_size=cfg.moe_ffn_hidden_size,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    return hf
