"""Tensor transforms between the HF on-disk layout and Megatron-Core's global (TP-independent) layout.

Each transform is a pair of pure functions on plain tensors: `to_mcore(hf_tensors, cfg) -> mcore_tensors` and
`to_hf(mcore_tensors, cfg) -> hf_tensors`, exact inverses of each other (permutations, splits and concatenations;
the one arithmetic transform, `norm_minus_one`, works in fp32 so the round trip is bit-exact). Each also has a
shape function per direction (`mcore_specs`, `hf_specs`): the outputs' shapes and dtypes for inputs of given shapes
and dtypes, computed arithmetically and failing where the transform's reshapes would. Converters plan and check a
checkpoint with them before reading any data; running the transforms on meta tensors would do the same, but the
first meta `cat`, `stack` or arithmetic op imports torch._dynamo (1-2 s of a converter's start-up). Transforms that
only place each HF tensor into one Megatron tensor (the expert stacks, [gate; up]) also say where each input lands
(`slots`): hf-to-mcore reads or splices the HF tensors straight into place, mcore-to-hf splices them back out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce
from typing import Callable

import torch

from megatron_slim.models.config import ModelConfig

Tensors = list[torch.Tensor]
Shape = tuple[int, ...]
Spec = tuple[Shape, torch.dtype]  # a tensor's shape and dtype
Specs = list[Spec]
Empty = Callable[[Shape, torch.dtype], torch.Tensor]  # allocates an uninitialised tensor


@dataclass(frozen=True)
class Transform:
    name: str
    to_mcore: Callable[[Tensors, ModelConfig], Tensors]
    to_hf: Callable[[Tensors, ModelConfig], Tensors]
    # The (shape, dtype) of each output of to_mcore / to_hf for inputs of the given (shape, dtype); a ValueError
    # where the transform would fail on such inputs.
    mcore_specs: Callable[[Specs, ModelConfig], Specs]
    hf_specs: Callable[[Specs, ModelConfig], Specs]
    # For transforms that only place each HF tensor into one megatron tensor (stacked experts, [gate; up]): given
    # the HF tensors (meta ones suffice) and an allocator, the output it allocated and, per input, the contiguous
    # view of it that input fills; to_hf returns exactly those views of its input. A converter then reads inputs
    # straight into place (no per-input buffers, no copy), or copies their bytes file to file.
    slots: Callable[[Tensors, ModelConfig, Empty], tuple[torch.Tensor, Tensors]] | None = None


def _view(shape: Shape, dims: tuple[int, ...]) -> Shape:
    """`dims` (one of them may be -1) as `Tensor.view` resolves it for a tensor of `shape`; ValueError where the
    element counts disagree, as view raises."""
    numel, known = math.prod(shape), math.prod(d for d in dims if d != -1)
    if dims.count(-1) > 1 or (-1 in dims and (known == 0 or numel % known)) or (-1 not in dims and known != numel):
        raise ValueError(f"shape {list(shape)} is invalid for a view as {list(dims)}")
    return tuple(numel // known if d == -1 else d for d in dims)


def _cat(shapes: list[Shape], dim: int) -> Shape:
    """The shape of torch.cat of tensors of `shapes` along `dim` (>= 0); ValueError where cat raises."""
    first = shapes[0]
    if len(first) <= dim or any(len(s) != len(first) or s[:dim] + s[dim + 1:] != first[:dim] + first[dim + 1:]
                                for s in shapes):
        raise ValueError(f"tensors of shapes {[list(s) for s in shapes]} do not concatenate along dimension {dim}")
    return (*first[:dim], sum(s[dim] for s in shapes), *first[dim + 1:])


def _halves(shape: Shape, dim: int) -> list[Shape]:
    """The shapes of torch.chunk(t, 2, dim) for `t` of `shape`; ValueError unless the dimension splits into two
    equal, non-empty halves ([gate; up] always does: an odd size would give gate and up different widths)."""
    if len(shape) <= dim or shape[dim] <= 0 or shape[dim] % 2:
        raise ValueError(f"a tensor of shape {list(shape)} does not halve along dimension {dim}")
    half = (*shape[:dim], shape[dim] // 2, *shape[dim + 1:])
    return [half, half]


def _dtype(specs: Specs) -> torch.dtype:
    """The dtype torch.cat or torch.stack gives tensors of these dtypes."""
    return reduce(torch.promote_types, (d for _, d in specs))


def _first(specs: Specs, c: ModelConfig) -> Specs:
    if not specs:
        raise ValueError("no input tensor")
    return [specs[0]]


IDENTITY = Transform("identity", lambda t, c: [t[0]], lambda t, c: [t[0]], _first, _first)


def _norm_to_mcore(t: Tensors, c: ModelConfig) -> Tensors:
    return [t[0].float() - 1.0]


def _norm_to_hf(t: Tensors, c: ModelConfig) -> Tensors:
    return [(t[0].float() + 1.0).to(_hf_dtype(c))]


def _hf_dtype(c: ModelConfig) -> torch.dtype:
    name = c.hf_config.get("dtype") or c.hf_config.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""))


# megatron-core zero-centres every norm when `layernorm_zero_centered_gamma` is set; Qwen3-Next's GDN output norm
# is a plain gated RMSNorm (x_hat * w), so its weight is stored as w - 1 (in fp32, to keep the round trip exact).
NORM_MINUS_ONE = Transform("norm_minus_one", _norm_to_mcore, _norm_to_hf,
                           lambda s, c: [(_first(s, c)[0][0], torch.float32)],
                           lambda s, c: [(_first(s, c)[0][0], _hf_dtype(c))])


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


def _qkv_mcore_specs(s: Specs, c: ModelConfig) -> Specs:
    (q, _), (k, _), (v, _) = s
    g, d, h = c.num_query_groups, c.head_dim, c.hidden_size
    hpg = c.num_attention_heads // g
    nq = 2 if c.attention_output_gate else 1
    _view(q, (g, hpg, 2, d, h) if c.attention_output_gate else (g, hpg * d, h))
    _view(k, (g, d, h))
    _view(v, (g, d, h))
    return [((g * (nq * hpg + 2) * d, h), _dtype(s))]


def _qkv_hf_specs(s: Specs, c: ModelConfig) -> Specs:
    g, d, h = c.num_query_groups, c.head_dim, c.hidden_size
    hpg = c.num_attention_heads // g
    nq = 2 if c.attention_output_gate else 1
    _view(_first(s, c)[0][0], (g, (nq * hpg + 2) * d, h))
    dtype = s[0][1]
    return [((g * nq * hpg * d, h), dtype), ((g * d, h), dtype), ((g * d, h), dtype)]


# Per query group: [queries, (gates), key, value] (megatron-core's linear_qkv, `attention_output_gate` adds gates).
QKV = Transform("qkv", _qkv_to_mcore, _qkv_to_hf, _qkv_mcore_specs, _qkv_hf_specs)


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


def _qkvz_mcore_specs(s: Specs, c: ModelConfig) -> Specs:
    nk, r, dk, dv = _gdn_dims(c)
    (shape, dtype), = _first(s, c)
    h = _view(shape, (nk, 2 * dk + 2 * r * dv, -1))[-1]
    return [((nk * dk, h), dtype), ((nk * dk, h), dtype), ((nk * r * dv, h), dtype), ((nk * r * dv, h), dtype)]


def _qkvz_hf_specs(s: Specs, c: ModelConfig) -> Specs:
    nk, r, dk, dv = _gdn_dims(c)
    (q, _), (k, _), (v, _), (z, _) = s
    if not q:
        raise ValueError("in_proj query section has no dimensions")
    h = q[-1]
    for shape, rows in ((q, dk), (k, dk), (v, r * dv), (z, r * dv)):
        _view(shape, (nk, rows, h))
    return [((nk * (2 * dk + 2 * r * dv), h), _dtype(s))]


# HF groups in_proj_qkvz per key head ([q_g, k_g, v_g, z_g]); megatron-core stores query/key/value/z sections.
GDN_QKVZ = Transform("gdn_qkvz", _qkvz_to_mcore, _qkvz_to_hf, _qkvz_mcore_specs, _qkvz_hf_specs)


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


def _ba_mcore_specs(s: Specs, c: ModelConfig) -> Specs:
    nk, r, _, _ = _gdn_dims(c)
    (shape, dtype), = _first(s, c)
    h = _view(shape, (nk, 2 * r, -1))[-1]
    return [((nk * r, h), dtype), ((nk * r, h), dtype)]


def _ba_hf_specs(s: Specs, c: ModelConfig) -> Specs:
    nk, r, _, _ = _gdn_dims(c)
    (b, _), (a, _) = s
    if not b:
        raise ValueError("beta has no dimensions")
    h = b[-1]
    _view(b, (nk, r, h))
    _view(a, (nk, r, h))
    return [((nk * 2 * r, h), _dtype(s))]


# HF in_proj_ba is [b_g, a_g] per key head; megatron-core stores beta and alpha sections.
GDN_BA = Transform("gdn_ba", _ba_to_mcore, _ba_to_hf, _ba_mcore_specs, _ba_hf_specs)


def _conv_sizes(c: ModelConfig) -> list[int]:
    kd = c.linear_num_key_heads * c.linear_key_head_dim
    return [kd, kd, c.linear_num_value_heads * c.linear_value_head_dim]


def _conv_mcore_specs(s: Specs, c: ModelConfig) -> Specs:
    (shape, dtype), = _first(s, c)
    sizes = _conv_sizes(c)
    if not shape or shape[0] != sum(sizes):
        raise ValueError(f"conv1d weight of shape {list(shape)} does not split into {sizes} channels")
    return [((n, *shape[1:]), dtype) for n in sizes]


# The depthwise conv runs over [q, k, v] channels in both layouts; megatron-core stores the three sections.
GDN_CONV = Transform(
    "gdn_conv",
    lambda t, c: list(torch.split(t[0], _conv_sizes(c), dim=0)),
    lambda t, c: [torch.cat(t, dim=0)],
    _conv_mcore_specs,
    lambda s, c: [(_cat([shape for shape, _ in s], 0), _dtype(s))],
)


def _expert_slots(parts: list[Tensors], empty: Empty) -> tuple[torch.Tensor, list[Tensors]]:
    """An empty [E, sum of part rows, ...] tensor for per-expert parts ([gate_e, up_e] or [down_e]) and, per expert
    and part, the view of it the part fills. Every expert's parts must match expert 0's exactly (no broadcasting)."""
    out_shape, rows = _expert_stack([[(tuple(p.shape), p.dtype) for p in group] for group in parts])
    out = empty(out_shape, parts[0][0].dtype)
    return out, [list(out[e].split(rows)) for e in range(len(parts))]


def _expert_stack(parts: list[Specs]) -> tuple[Shape, list[int]]:
    """The shape of the [E, sum of part rows, ...] stack of per-expert parts, and the parts' row counts; ValueError
    unless every expert's parts match expert 0's exactly and share their trailing dimensions."""
    if not parts or not parts[0]:
        raise ValueError("no expert tensors to stack")
    first = parts[0]
    for e, group in enumerate(parts):
        if group != first or any(not shape or shape[1:] != first[0][0][1:] for shape, _ in group):
            raise ValueError(f"expert {e}'s tensors {group} do not stack with expert 0's {first}")
    rows = [shape[0] for shape, _ in first]
    return (len(parts), sum(rows), *first[0][0][1:]), rows


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


def _glu_pair(s: Specs) -> tuple[Shape, list[int]]:
    """The shape of [gate; up] and the rows of each; ValueError unless both are alike (same shape and dtype)."""
    (gate, gate_dtype), (up, up_dtype) = s
    if not gate or gate != up or gate_dtype != up_dtype:
        raise ValueError(f"gate {gate_dtype}{list(gate)} and up {up_dtype}{list(up)} projections do not pair")
    return (2 * gate[0], *gate[1:]), [gate[0], up[0]]


def _glu_slots(t: Tensors, c: ModelConfig, empty: Empty) -> tuple[torch.Tensor, Tensors]:
    shape, rows = _glu_pair([(tuple(x.shape), x.dtype) for x in t])
    out = empty(shape, t[0].dtype)
    return out, list(out.split(rows))


GLU = Transform(
    "glu",  # [gate; up] -> linear_fc1 (megatron's SwiGLU order: first half gated by SiLU)
    _filled(_glu_slots),
    lambda t, c: list(torch.chunk(t[0], 2, dim=0)),
    lambda s, c: [(_glu_pair(s)[0], s[0][1])],
    lambda s, c: [(half, s[0][1]) for half in _halves(_first(s, c)[0][0], 0)],
    _glu_slots,
)


def _experts_fc1_slots(t: Tensors, c: ModelConfig, empty: Empty) -> tuple[torch.Tensor, Tensors]:
    n = len(t) // 2
    out, views = _expert_slots([[t[e], t[n + e]] for e in range(n)], empty)
    return out, [v[0] for v in views] + [v[1] for v in views]  # input order: all gates, then all ups


def _experts_fc1_mcore_specs(s: Specs, c: ModelConfig) -> Specs:
    n = len(s) // 2
    if len(s) != 2 * n:
        raise ValueError(f"{len(s)} expert tensors: not a gate and an up projection per expert")
    return [(_expert_stack([[s[e], s[n + e]] for e in range(n)])[0], s[0][1])]


def _experts_fc1_hf_specs(s: Specs, c: ModelConfig) -> Specs:
    (shape, dtype), = _first(s, c)
    gate, up = _halves(shape, 1)
    return [(gate[1:], dtype)] * shape[0] + [(up[1:], dtype)] * shape[0]


def _experts_fc1_to_hf(t: Tensors, c: ModelConfig) -> Tensors:
    gate, up = torch.chunk(t[0], 2, dim=1)
    return list(gate.unbind(0)) + list(up.unbind(0))


def _experts_fc2_slots(t: Tensors, c: ModelConfig, empty: Empty) -> tuple[torch.Tensor, Tensors]:
    out, views = _expert_slots([[x] for x in t], empty)
    return out, [v[0] for v in views]


def _experts_fc2_hf_specs(s: Specs, c: ModelConfig) -> Specs:
    (shape, dtype), = _first(s, c)
    if not shape:
        raise ValueError("an expert stack has no expert dimension")
    return [(shape[1:], dtype)] * shape[0]


# Per-expert HF [gate_e] + [up_e] -> megatron-core's [E, 2F, H] (expert axis prepended to linear_fc1).
EXPERTS_FC1 = Transform("experts_fc1", _filled(_experts_fc1_slots), _experts_fc1_to_hf, _experts_fc1_mcore_specs,
                        _experts_fc1_hf_specs, _experts_fc1_slots)
EXPERTS_FC2 = Transform("experts_fc2", _filled(_experts_fc2_slots), lambda t, c: list(t[0].unbind(0)),
                        lambda s, c: [(_expert_stack([[x] for x in s])[0], s[0][1])], _experts_fc2_hf_specs,
                        _experts_fc2_slots)
