"""Mixtral surgery table (data only): Llama attention, experts under `block_sparse_moe` as w1/w3/w2."""
from megatron_slim.models.common_surgery import HEAD, attention, routed_experts
from megatron_slim.models.surgery_spec import SurgerySpec

SPEC = SurgerySpec(HEAD | attention(qk_norm=False)
                   | routed_experts("block_sparse_moe.", "w1.weight", "w3.weight", "w2.weight", "gate.weight"))
