"""Qwen3-MoE surgery table (data only): GQA with q/k norms, routed SwiGLU experts, optional dense MLP layers."""
from megatron_slim.models.common_surgery import DENSE_MLP, HEAD, attention, routed_experts
from megatron_slim.models.surgery_spec import SurgerySpec

SPEC = SurgerySpec(HEAD | attention(qk_norm=True) | DENSE_MLP
                   | routed_experts("mlp.", "gate_proj.weight", "up_proj.weight", "down_proj.weight", "gate.weight"))
