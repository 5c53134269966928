"""Mixtral-style MoE (`MixtralForCausalLM`): Llama attention (no q/k norm), softmax top-k router, SwiGLU experts.
Dense Llama-architecture models become this family when upcycled."""
from __future__ import annotations

from typing import Any

from megatron_slim.models.config import ATTENTION, MOE, ModelConfig
from megatron_slim.models.hf_fields import decoder_fields, require_values

NAME = "mixtral"
ARCHITECTURE = "MixtralForCausalLM"


def from_hf(hf: dict[str, Any]) -> ModelConfig:
    require_values(hf, {"hidden_act": ("silu",), "sliding_window": (None,), "router_jitter_noise": (0, 0.0),
                        "attention_bias": (False,), "mlp_bias": (False,)}, NAME)
    n = hf["num_hidden_layers"]
    return ModelConfig(
        **decoder_fields(hf, NAME),
        num_experts=hf["num_local_experts"],
        topk=hf["num_experts_per_tok"],
        moe_ffn_hidden_size=hf["intermediate_size"],
        norm_topk_prob=True,  # Mixtral: softmax over the selected top-k logits
        mixer_types=[ATTENTION] * n,
        mlp_types=[MOE] * n,
    )


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The HF config describing `cfg` (e.g. after pruning), keeping every field we do not model."""
    hf = dict(cfg.hf_config)
    hf.update(
        architectures=[ARCHITECTURE], model_type="mixtral", vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups, head_dim=cfg.head_dim, num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.topk, intermediate_size=cfg.moe_ffn_hidden_size,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    return hf
