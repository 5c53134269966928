"""Rule tables shared by several families (attention, SwiGLU MLPs); family adapters compose them."""
from __future__ import annotations

from megatron_slim.models.mapping import Rule
from megatron_slim.models.transforms import EXPERTS_FC1, EXPERTS_FC2, GLU, QKV

EMBEDDING = Rule(("embedding.word_embeddings.weight",), ("model.embed_tokens.weight",))
FINAL_NORM = Rule(("decoder.final_norm.weight",), ("model.norm.weight",))
OUTPUT = Rule(("output_layer.weight",), ("lm_head.weight",))


def attention(qk_norm: bool) -> list[Rule]:
    rules = [
        Rule(("self_attention.linear_qkv.layer_norm_weight",), ("input_layernorm.weight",)),
        Rule(("self_attention.linear_qkv.weight",),
             ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), QKV),
        Rule(("self_attention.linear_proj.weight",), ("self_attn.o_proj.weight",)),
    ]
    if qk_norm:
        rules += [Rule(("self_attention.q_layernorm.weight",), ("self_attn.q_norm.weight",)),
                  Rule(("self_attention.k_layernorm.weight",), ("self_attn.k_norm.weight",))]
    return rules


def routed_experts(block: str, gate: str, up: str, down: str, router: str) -> list[Rule]:
    """Router and per-expert SwiGLU weights under `block` (e.g. "mlp." or "block_sparse_moe.")."""
    return [
        Rule(("pre_mlp_layernorm.weight",), ("post_attention_layernorm.weight",)),
        Rule(("mlp.router.weight",), (block + router,)),
        Rule(("mlp.experts.experts.linear_fc1.weight",), (block + "experts.{e}." + gate, block + "experts.{e}." + up),
             EXPERTS_FC1),
        Rule(("mlp.experts.experts.linear_fc2.weight",), (block + "experts.{e}." + down,), EXPERTS_FC2),
    ]


DENSE_MLP = [
    Rule(("mlp.linear_fc1.layer_norm_weight",), ("post_attention_layernorm.weight",)),
    Rule(("mlp.linear_fc1.weight",), ("mlp.gate_proj.weight", "mlp.up_proj.weight"), GLU),
    Rule(("mlp.linear_fc2.weight",), ("mlp.down_proj.weight",)),
]
