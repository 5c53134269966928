"""Qwen3-MoE HF <-> Megatron-Core parameter mapping (data only)."""
from megatron_slim.models.common_mappings import DENSE_MLP, EMBEDDING, FINAL_NORM, OUTPUT, attention, routed_experts
from megatron_slim.models.config import ATTENTION, DENSE_MLP as DENSE, MOE
from megatron_slim.models.mapping import FamilyMapping

MAPPING = FamilyMapping(
    head=[EMBEDDING],
    mixers={ATTENTION: attention(qk_norm=True)},
    mlps={MOE: routed_experts("mlp.", "gate_proj.weight", "up_proj.weight", "down_proj.weight", "gate.weight"),
          DENSE: DENSE_MLP},
    tail=[FINAL_NORM, OUTPUT],
    tied_tail=[FINAL_NORM],
)
