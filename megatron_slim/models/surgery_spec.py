"""Which dimension of which tensor each kind of pruning selects on, declared as data per family (HF names).

A family's `SurgerySpec` lists every HF tensor: names inside a decoder or MTP layer are relative to the layer
(`self_attn.q_proj.weight`), names outside layers are absolute (`model.embed_tokens.weight`, `mtp.fc.weight`), and
`{e}` stands for the routed-expert index (such tensors are merged across experts by the plan's expert slots). A
tensor the spec does not list is an error, so a new family cannot silently skip pruning some weight.

A pruned dimension is a concatenation of `sections` (default: the whole dimension), each laid out unit-major as
[units, unit_size]: a query group owns a contiguous block of q_proj rows, a GDN key head owns one block in each of
the conv's q/k/v sections, a hidden channel is one column of mtp.fc in each of its two input halves.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from megatron_slim.models.config import ModelConfig

# Pruning axes, named after the CompressionPlan fields that select on them.
HIDDEN = "hidden_channels"
QUERY_GROUPS = "query_groups"
GDN_KEY_HEADS = "gdn_key_heads"
EXPERTS = "experts"  # router rows (per-expert weights are separate `{e}` tensors)
EXPERT_NEURONS = "expert_neurons"
SHARED_NEURONS = "shared_expert_neurons"
DENSE_NEURONS = "dense_mlp_neurons"

Sections = Callable[[ModelConfig], tuple[int, ...]]


@dataclass(frozen=True)
class Dim:
    axis: str
    dim: int
    sections: Sections | None = None


@dataclass(frozen=True)
class TensorSpec:
    dims: tuple[Dim, ...] = ()
    norm: bool = False  # an RMSNorm weight over the hidden channels: rescaled when channels are pruned


@dataclass(frozen=True)
class SurgerySpec:
    tensors: dict[str, TensorSpec]


def units(cfg: ModelConfig, axis: str) -> int:
    """How many units the source model has along `axis`."""
    return {HIDDEN: cfg.hidden_size, QUERY_GROUPS: cfg.num_query_groups, GDN_KEY_HEADS: cfg.linear_num_key_heads,
            EXPERTS: cfg.num_experts, EXPERT_NEURONS: cfg.moe_ffn_hidden_size,
            SHARED_NEURONS: cfg.shared_expert_ffn_hidden_size, DENSE_NEURONS: cfg.dense_ffn_hidden_size}[axis]
