"""Surgery tables shared by several families (attention, SwiGLU MLPs, embeddings and head); see
`models/surgery_spec.py`. Family tables in `models/<family>/surgery_spec.py` compose them."""
from __future__ import annotations

from megatron_slim.models.surgery_spec import (
    DENSE_NEURONS,
    EXPERT_NEURONS,
    EXPERTS,
    HIDDEN,
    QUERY_GROUPS,
    Dim,
    TensorSpec,
)

HIDDEN_COLUMNS = TensorSpec((Dim(HIDDEN, 1),))  # [*, H]: embedding, LM head, a gate reading the stream
NORM = TensorSpec((Dim(HIDDEN, 0),), norm=True)
UNTOUCHED = TensorSpec()

HEAD = {"model.embed_tokens.weight": HIDDEN_COLUMNS,
        "model.norm.weight": NORM,
        "lm_head.weight": HIDDEN_COLUMNS}


def attention(qk_norm: bool) -> dict[str, TensorSpec]:
    """GQA: q_proj rows (with Qwen3-Next's per-head gates) and k/v rows are grouped by query group."""
    reads_group = TensorSpec((Dim(QUERY_GROUPS, 0), Dim(HIDDEN, 1)))
    out = {"input_layernorm.weight": NORM,
           "self_attn.q_proj.weight": reads_group,
           "self_attn.k_proj.weight": reads_group,
           "self_attn.v_proj.weight": reads_group,
           "self_attn.o_proj.weight": TensorSpec((Dim(HIDDEN, 0), Dim(QUERY_GROUPS, 1)))}
    if qk_norm:  # per-head-dim weights, shared by all heads
        out |= {"self_attn.q_norm.weight": UNTOUCHED, "self_attn.k_norm.weight": UNTOUCHED}
    return out


def routed_experts(block: str, gate: str, up: str, down: str, router: str) -> dict[str, TensorSpec]:
    """Router rows follow the expert slots; each expert's SwiGLU is merged per slot, then its neurons selected."""
    fc1 = TensorSpec((Dim(EXPERT_NEURONS, 0), Dim(HIDDEN, 1)))
    return {"post_attention_layernorm.weight": NORM,
            block + router: TensorSpec((Dim(EXPERTS, 0), Dim(HIDDEN, 1))),
            block + "experts.{e}." + gate: fc1,
            block + "experts.{e}." + up: fc1,
            block + "experts.{e}." + down: TensorSpec((Dim(HIDDEN, 0), Dim(EXPERT_NEURONS, 1)))}


def swiglu(prefix: str, axis: str) -> dict[str, TensorSpec]:
    fc1 = TensorSpec((Dim(axis, 0), Dim(HIDDEN, 1)))
    return {prefix + "gate_proj.weight": fc1, prefix + "up_proj.weight": fc1,
            prefix + "down_proj.weight": TensorSpec((Dim(HIDDEN, 0), Dim(axis, 1)))}


DENSE_MLP = {"post_attention_layernorm.weight": NORM} | swiglu("mlp.", DENSE_NEURONS)
