"""Qwen3-Next HF <-> Megatron-Core parameter mapping (data only).

Gated attention (q_proj holds [query, gate] per head), Gated DeltaNet (grouped in_proj_qkvz/in_proj_ba, conv1d,
A_log, dt_bias, plain gated output norm), MoE with a sigmoid-gated shared expert, and the MTP head
(`mtp.fc` projects [norm(embedding), norm(hidden)], like megatron-core's eh_proj).
"""
from megatron_slim.models.common_mappings import DENSE_MLP, EMBEDDING, FINAL_NORM, OUTPUT, attention, routed_experts
from megatron_slim.models.config import ATTENTION, DENSE_MLP as DENSE, GDN, MOE
from megatron_slim.models.mapping import FamilyMapping, Rule
from megatron_slim.models.transforms import GDN_BA, GDN_CONV, GDN_QKVZ, GLU, NORM_MINUS_ONE

_IN = "self_attention.in_proj.weight."
_CONV = "self_attention.conv1d.weight."
GATED_DELTANET = [
    Rule(("self_attention.in_proj.layer_norm_weight",), ("input_layernorm.weight",)),
    Rule((_IN + "query", _IN + "key", _IN + "value", _IN + "z"), ("linear_attn.in_proj_qkvz.weight",), GDN_QKVZ),
    Rule((_IN + "beta", _IN + "alpha"), ("linear_attn.in_proj_ba.weight",), GDN_BA),
    Rule((_CONV + "query", _CONV + "key", _CONV + "value"), ("linear_attn.conv1d.weight",), GDN_CONV),
    Rule(("self_attention.A_log",), ("linear_attn.A_log",)),
    Rule(("self_attention.dt_bias",), ("linear_attn.dt_bias",)),
    Rule(("self_attention.out_norm.weight",), ("linear_attn.norm.weight",), NORM_MINUS_ONE),
    Rule(("self_attention.out_proj.weight",), ("linear_attn.out_proj.weight",)),
]
SHARED_EXPERT = [
    Rule(("mlp.shared_experts.linear_fc1.weight",),
         ("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight"), GLU),
    Rule(("mlp.shared_experts.linear_fc2.weight",), ("mlp.shared_expert.down_proj.weight",)),
    Rule(("mlp.shared_experts.gate_weight",), ("mlp.shared_expert_gate.weight",)),
]
MTP = [
    Rule(("enorm.weight",), ("pre_fc_norm_embedding.weight",)),
    Rule(("hnorm.weight",), ("pre_fc_norm_hidden.weight",)),
    Rule(("eh_proj.weight",), ("fc.weight",)),
    Rule(("final_layernorm.weight",), ("norm.weight",)),
]

MAPPING = FamilyMapping(
    head=[EMBEDDING],
    mixers={GDN: GATED_DELTANET, ATTENTION: attention(qk_norm=True)},
    mlps={MOE: routed_experts("mlp.", "gate_proj.weight", "up_proj.weight", "down_proj.weight", "gate.weight")
          + SHARED_EXPERT,
          DENSE: DENSE_MLP},
    tail=[FINAL_NORM, OUTPUT],
    tied_tail=[FINAL_NORM],
    mtp=MTP,
)
