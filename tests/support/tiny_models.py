"""Tiny HF configs of every supported family (random weights; nothing downloaded). A family added to `FAMILIES`
is covered by the parametrised parsing, conversion, surgery and layout tests."""
from __future__ import annotations

from typing import Any

VOCAB = 128


def qwen3_moe(**over: Any) -> dict[str, Any]:
    cfg = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=VOCAB, hidden_size=64,
               intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               hidden_act="silu", max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
               rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, attention_bias=False,
               use_sliding_window=False, decoder_sparse_step=1, moe_intermediate_size=32, num_experts_per_tok=2,
               num_experts=8, norm_topk_prob=True, router_aux_loss_coef=0.0, mlp_only_layers=[],
               initializer_range=0.1)
    cfg.update(over)
    return cfg


def qwen3_next(**over: Any) -> dict[str, Any]:
    cfg = dict(architectures=["Qwen3NextForCausalLM"], model_type="qwen3_next", vocab_size=VOCAB, hidden_size=64,
               intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               hidden_act="silu", max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
               rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.25, "rope_type": "default"},
               attention_bias=False, linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
               linear_num_key_heads=2, linear_num_value_heads=4, decoder_sparse_step=1, moe_intermediate_size=32,
               shared_expert_intermediate_size=48, num_experts_per_tok=2, num_experts=8, norm_topk_prob=True,
               router_aux_loss_coef=0.0, mlp_only_layers=[],
               layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
               initializer_range=0.1)
    cfg.update(over)
    return cfg


def mixtral(**over: Any) -> dict[str, Any]:
    cfg = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=VOCAB, hidden_size=64,
               intermediate_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               hidden_act="silu", max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
               rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, sliding_window=None,
               num_experts_per_tok=2, num_local_experts=8, router_jitter_noise=0.0, router_aux_loss_coef=0.0,
               initializer_range=0.1)
    cfg.update(over)
    return cfg


FAMILIES = {"qwen3_moe": qwen3_moe, "qwen3_next": qwen3_next, "mixtral": mixtral}
