"""Mixtral HF <-> Megatron-Core parameter mapping (data only): experts live under `block_sparse_moe` as w1/w3/w2."""
from megatron_slim.models.common_mappings import EMBEDDING, FINAL_NORM, OUTPUT, attention, routed_experts
from megatron_slim.models.config import ATTENTION, MOE
from megatron_slim.models.mapping import FamilyMapping

MAPPING = FamilyMapping(
    head=[EMBEDDING],
    mixers={ATTENTION: attention(qk_norm=False)},
    mlps={MOE: routed_experts("block_sparse_moe.", "w1.weight", "w3.weight", "w2.weight", "gate.weight")},
    tail=[FINAL_NORM, OUTPUT],
    tied_tail=[FINAL_NORM],
)
