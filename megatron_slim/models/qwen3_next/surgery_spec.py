"""Qwen3-Next surgery table (data only).

Gated DeltaNet tensors are grouped per key head in the HF layout (a key head owns its q/k rows and its value
heads' v/z/b/a rows, conv channels, A_log/dt_bias entries and out_proj columns); its output norm is per value-head
dim and untouched. The MTP fc reads [norm(embedding), norm(hidden)]: both halves of its input lose the pruned
hidden channels. All hidden-size norms are zero-centred, which the rescaling takes from the config.
"""
from megatron_slim.models.common_surgery import (
    DENSE_MLP,
    HEAD,
    HIDDEN_COLUMNS,
    NORM,
    UNTOUCHED,
    attention,
    routed_experts,
    swiglu,
)
from megatron_slim.models.config import ModelConfig
from megatron_slim.models.surgery_spec import GDN_KEY_HEADS, HIDDEN, SHARED_NEURONS, Dim, SurgerySpec, TensorSpec


def _conv_sections(c: ModelConfig) -> tuple[int, ...]:
    key = c.linear_num_key_heads * c.linear_key_head_dim
    return key, key, c.linear_num_value_heads * c.linear_value_head_dim


def _fc_sections(c: ModelConfig) -> tuple[int, ...]:
    return c.hidden_size, c.hidden_size


_HEADS = TensorSpec((Dim(GDN_KEY_HEADS, 0),))
GATED_DELTANET = {
    "input_layernorm.weight": NORM,
    "linear_attn.in_proj_qkvz.weight": TensorSpec((Dim(GDN_KEY_HEADS, 0), Dim(HIDDEN, 1))),
    "linear_attn.in_proj_ba.weight": TensorSpec((Dim(GDN_KEY_HEADS, 0), Dim(HIDDEN, 1))),
    "linear_attn.conv1d.weight": TensorSpec((Dim(GDN_KEY_HEADS, 0, _conv_sections),)),
    "linear_attn.A_log": _HEADS,
    "linear_attn.dt_bias": _HEADS,
    "linear_attn.norm.weight": UNTOUCHED,
    "linear_attn.out_proj.weight": TensorSpec((Dim(HIDDEN, 0), Dim(GDN_KEY_HEADS, 1))),
}
SHARED_EXPERT = swiglu("mlp.shared_expert.", SHARED_NEURONS) | {"mlp.shared_expert_gate.weight": HIDDEN_COLUMNS}
MTP = {"mtp.fc.weight": TensorSpec((Dim(HIDDEN, 0), Dim(HIDDEN, 1, _fc_sections))),
       "mtp.pre_fc_norm_embedding.weight": NORM,
       "mtp.pre_fc_norm_hidden.weight": NORM,
       "mtp.norm.weight": NORM}

SPEC = SurgerySpec(HEAD | GATED_DELTANET | attention(qk_norm=True) | DENSE_MLP | SHARED_EXPERT | MTP
                   | routed_experts("mlp.", "gate_proj.weight", "up_proj.weight", "down_proj.weight", "gate.weight"))
