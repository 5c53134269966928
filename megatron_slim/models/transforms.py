"""Tensor transforms between the HF on-disk layout and Megatron-Core's global (TP-independent) layout.

Each transform is a pair of pure functions on plain tensors: `to_mcore(hf_tensors, cfg) -> mcore_tensors` and
`to_hf(mcore_tensors, cfg) -> hf_tensors`, exact inverses of each other (permutations, splits and concatenations;
the one arithmetic transform, `norm_minus_one`, works in fp32 so the round trip is bit-exact). They also run on
meta tensors, which is how converters learn output shapes before any data is read. The expert stacks also say
where each input lands (`slots`), so hf-to-mcore reads expert weights straight into the stacked tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megatron_slim.models.config import ModelConfig

Tensors = list[torch.Tensor]
Empty = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]  # allocates an uninitialised tensor


@dataclass(frozen=True)
class Transform:
    name: str
    to_mcore: Callable[[Tensors, ModelConfig], Tensors]
    to_hf: Callable[[Tensors, ModelConfig], Tensors]
    # For transforms that only place each HF tensor into one megatron tensor (stacked experts): given the HF
    # tensors (meta ones suffice) and an allocator, the output it allocated and, per input, the contiguous view of
    # it that input fills. A converter then reads inputs straight into place: no per-input buffers, no copy.
    slots: Callable[[Tensors, ModelConfig, Empty], tuple[torch.Tensor, Tensors]] | None = None


IDENTITY = Transform("identity", lambda t, c: [t[0]], lambda t, c: [t[0]])


def _norm_to_mcore(t: Tensors, c: ModelConfig) -> Tensors:
    return [t[0].float() - 1.0]


def _norm_to_hf(t: Tensors, c: ModelConfig) -> Tensors:
    return [(t[0].float() + 1.0).to(_hf_dtype(c))]


def _hf_dtype(c: ModelConfig) -> torch.dtype:
    name = c.hf_config.get("dtype") or c.hf_config.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""))


# megatron-core zero-centres every norm when `layernorm_zero_centered_gamma` is set; Qwen3-Next's GDN output norm
# is a plain gated RMSNorm (x_hat * w), so its weight is stored as w - 1 (in fp32, to keep the round trip exact).
NORM_MINUS_ONE = Transform("norm_minus_one", _norm_to_mcore, _norm_to_hf)

GLU = Transform(
    "glu",  # [gate; up] -> linear_fc1 (megatron's SwiGLU order: first half gated by SiLU)
    lambda t, c: [torch.cat([t[0], t[1]], dim=0)],
    lambda t, c: list(torch.chunk(t[0], 2, dim=0)),
)


def _qkv_to_mcore(t: Tensors, c: ModelConfig) -> Tensors:
    q, k, v = t
    g, d, h = c.num_query_groups, c.head_dim, c.hidden_size
    hpg = c.num_attention_heads // g
    if c.attention_output_gate:  # HF q_proj rows per head: [query, gate]
        qg = q.view(g, hpg, 2, d, h)
        parts = [qg[:, :, 0].reshape(g, hpg * d, h), qg[:, :, 1].reshape(g, hpg * d, h)]
    else:
        parts = [q.view(g, hpg * d, h)]
    parts += [k.view(g, d, h), v.view(g, d, h)]
    return [torch.cat(parts, dim=1).reshape(-1, h)]


def _qkv_to_hf(t: Tensors, c: ModelConfig) -> Tensors:
    g, d, h = c.num_query_groups, c.head_dim, c.hidden_size
    hpg = c.num_attention_heads // g
    nq = 2 if c.attention_output_gate else 1
    x = t[0].view(g, (nq * hpg + 2) * d, h)
    q, k, v = torch.split(x, [nq * hpg * d, d, d], dim=1)
    if c.attention_output_gate:
        query, gate = torch.split(q, [hpg * d, hpg * d], dim=1)
        q = torch.stack([query.view(g, hpg, d, h), gate.view(g, hpg, d, h)], dim=2)
    return [q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)]


# Per query group: [queries, (gates), key, value] (megatron-core's linear_qkv, `attention_output_gate` adds gates).
QKV = Transform("qkv", _qkv_to_mcore, _qkv_to_hf)


def _gdn_dims(c: ModelConfig) -> tuple[int, int, int, int]:
    nk, nv = c.linear_num_key_heads, c.linear_num_value_heads
    return nk, nv // nk, c.linear_key_head_dim, c.linear_value_head_dim


def _qkvz_to_mcore(t: Tensors, c: ModelConfig) -> Tensors:
    nk, r, dk, dv = _gdn_dims(c)
    x = t[0].view(nk, 2 * dk + 2 * r * dv, -1)
    q, k, v, z = torch.split(x, [dk, dk, r * dv, r * dv], dim=1)
    return [y.reshape(-1, x.shape[-1]) for y in (q, k, v, z)]


def _qkvz_to_hf(t: Tensors, c: ModelConfig) -> Tensors:
    nk, r, dk, dv = _gdn_dims(c)
    q, k, v, z = t
    h = q.shape[-1]
    parts = [q.view(nk, dk, h), k.view(nk, dk, h), v.view(nk, r * dv, h), z.view(nk, r * dv, h)]
    return [torch.cat(parts, dim=1).reshape(-1, h)]


# HF groups in_proj_qkvz per key head ([q_g, k_g, v_g, z_g]); megatron-core stores query/key/value/z sections.
GDN_QKVZ = Transform("gdn_qkvz", _qkvz_to_mcore, _qkvz_to_hf)


def _ba_to_mcore(t: Tensors, c: ModelConfig) -> Tensors:
    nk, r, _, _ = _gdn_dims(c)
    x = t[0].view(nk, 2 * r, -1)
    b, a = torch.split(x, [r, r], dim=1)
    return [b.reshape(-1, x.shape[-1]), a.reshape(-1, x.shape[-1])]


def _ba_to_hf(t: Tensors, c: ModelConfig) -> Tensors:
    nk, r, _, _ = _gdn_dims(c)
    b, a = t
    h = b.shape[-1]
    return [torch.cat([b.view(nk, r, h), a.view(nk, r, h)], dim=1).reshape(-1, h)]


# HF in_proj_ba is [b_g, a_g] per key head; megatron-core stores beta and alpha sections.
GDN_BA = Transform("gdn_ba", _ba_to_mcore, _ba_to_hf)


def _conv_sizes(c: ModelConfig) -> list[int]:
    kd = c.linear_num_key_heads * c.linear_key_head_dim
    return [kd, kd, c.linear_num_value_heads * c.linear_value_head_dim]


# The depthwise conv runs over [q, k, v] channels in both layouts; megatron-core stores the three sections.
GDN_CONV = Transform(
    "gdn_conv",
    lambda t, c: list(torch.split(t[0], _conv_sizes(c), dim=0)),
    lambda t, c: [torch.cat(t, dim=0)],
)


def _expert_slots(parts: list[Tensors], empty: Empty) -> tuple[torch.Tensor, list[Tensors]]:
    """An empty [E, sum of part rows, ...] tensor for per-expert parts ([gate_e, up_e] or [down_e]) and, per expert
    and part, the view of it the part fills. Every expert's parts must match expert 0's exactly (no broadcasting)."""
    def sig(group: Tensors) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        return [(p.dtype, tuple(p.shape)) for p in group]

    first = parts[0]
    for e, group in enumerate(parts):
        if sig(group) != sig(first) or any(p.shape[1:] != first[0].shape[1:] for p in group):
            raise ValueError(f"expert {e}'s tensors {sig(group)} do not stack with expert 0's {sig(first)}")
    rows = [p.shape[0] for p in first]
    out = empty((len(parts), sum(rows), *first[0].shape[1:]), first[0].dtype)
    return out, [list(out[e].split(rows)) for e in range(len(parts))]


def _filled(slots: Callable[[Tensors, ModelConfig, Empty], tuple[torch.Tensor, Tensors]]
            ) -> Callable[[Tensors, ModelConfig], Tensors]:
    """to_mcore of a slots transform: each input copied once into its place (torch.cat then torch.stack would
    copy twice)."""
    def to_mcore(t: Tensors, c: ModelConfig) -> Tensors:
        out, views = slots(t, c, lambda shape, dtype: torch.empty(shape, dtype=dtype, device=t[0].device))
        for view, x in zip(views, t):
            view.copy_(x)
        return [out]
    return to_mcore


def _experts_fc1_slots(t: Tensors, c: ModelConfig, empty: Empty) -> tuple[torch.Tensor, Tensors]:
    n = len(t) // 2
    out, views = _expert_slots([[t[e], t[n + e]] for e in range(n)], empty)
    return out, [v[0] for v in views] + [v[1] for v in views]  # input order: all gates, then all ups


def _experts_fc2_slots(t: Tensors, c: ModelConfig, empty: Empty) -> tuple[torch.Tensor, Tensors]:
    out, views = _expert_slots([[x] for x in t], empty)
    return out, [v[0] for v in views]


def _experts_fc1_to_hf(t: Tensors, c: ModelConfig) -> Tensors:
    gate, up = torch.chunk(t[0], 2, dim=1)
    return list(gate.unbind(0)) + list(up.unbind(0))


# Per-expert HF [gate_e] + [up_e] -> megatron-core's [E, 2F, H] (expert axis prepended to linear_fc1).
EXPERTS_FC1 = Transform("experts_fc1", _filled(_experts_fc1_slots), _experts_fc1_to_hf, _experts_fc1_slots)
EXPERTS_FC2 = Transform("experts_fc2", _filled(_experts_fc2_slots), lambda t, c: list(t[0].unbind(0)),
                        _experts_fc2_slots)
