"""Pruning and merging operations on plain tensors (no file formats, no module names).

Every function also runs on meta tensors (except neuron alignment, which needs values), which is how the driver
learns output shapes before reading any data. Arithmetic runs in float32 (float64 stays float64) and results are
cast back to the input dtype.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from megatron_slim.compress.plan import ExpertSlot


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def select_units(t: torch.Tensor, dim: int, keep: Sequence[int], n_units: int,
                 sections: Sequence[int] | None = None) -> torch.Tensor:
    """Keep units `keep` (in that order) of dimension `dim`, which is `sections` blocks each laid out [n_units, size]
    (e.g. a query group's q_proj rows; a GDN key head's channels in each of the conv's q/k/v sections)."""
    sizes = list(sections) if sections is not None else [t.shape[dim]]
    if sum(sizes) != t.shape[dim] or any(s % n_units for s in sizes):
        raise ValueError(f"dimension {dim} of size {t.shape[dim]} is not {len(sizes)} sections {sizes} of "
                         f"{n_units} equal units")
    index = torch.as_tensor(list(keep), dtype=torch.long, device=t.device)
    blocks = [b.unflatten(dim, (n_units, -1)).index_select(dim, index).flatten(dim, dim + 1)
              for b in torch.split(t, sizes, dim)]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim)


def rescale_norm(weight: torch.Tensor, kept: int, total: int, zero_centered: bool) -> torch.Tensor:
    """RMSNorm weight for `kept` of `total` hidden channels, compensating the smaller mean in the RMS.

    RMSNorm divides by sqrt(sum(x^2) / H + eps). When the dropped channels are zero, the sum is unchanged but H
    shrinks, so every output would shrink by sqrt(kept / total); scaling the gain by sqrt(total / kept) restores the
    original outputs up to eps (exact up to eps * (1 - kept / total) / mean(x^2), since eps is not rescaled: it is
    one config value shared with the q/k norms). For real pruning the dropped channels are the low-magnitude ones,
    so this is close to exact too; without it every pruned layer would see inputs scaled by sqrt(kept / total).
    A zero-centred norm computes x_hat * (1 + w), so there the factor applies to 1 + w."""
    w = weight.to(compute_dtype(weight))
    scale = math.sqrt(total / kept)
    out = (1.0 + w) * scale - 1.0 if zero_centered else w * scale
    return out.to(weight.dtype)


def neuron_features(tensors: Sequence[torch.Tensor], neuron_dims: Sequence[int]) -> torch.Tensor:
    """[F, D]: each FFN neuron's weights (its gate and up rows, its down column, ...) as one vector."""
    return torch.cat([t.movedim(d, 0).reshape(t.shape[d], -1) for t, d in zip(tensors, neuron_dims)], dim=1)


def match_neurons(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """perm with other[perm[i]] matched to base[i] (features [F, D]), maximising cosine similarity greedily.

    Rounds of mutual best matches among the unmatched neurons: each round assigns every pair that prefers each
    other, which always includes the best remaining pair; an exact permutation of the base is recovered exactly."""
    sim = F.normalize(base.to(compute_dtype(base)), dim=1) @ F.normalize(other.to(compute_dtype(other)), dim=1).T
    n = sim.shape[0]
    perm = torch.full((n,), -1, dtype=torch.long)
    free_rows, free_cols = torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)
    while free_rows.any():
        s = sim.masked_fill(~(free_rows[:, None] & free_cols[None, :]), -math.inf)
        best_col, best_row = s.argmax(1), s.argmax(0)
        rows = free_rows.nonzero().squeeze(1)
        rows = rows[best_row[best_col[rows]] == rows]
        if rows.numel() == 0:  # ties can hide the mutual pairs; the overall best pair is always safe
            rows = (s.argmax() // n).reshape(1)
        perm[rows] = best_col[rows]
        free_rows[rows], free_cols[best_col[rows]] = False, False
    return perm


def merge_experts(experts: Sequence[Sequence[torch.Tensor]], weights: Sequence[float],
                  neuron_dims: Sequence[int], align: bool = False) -> list[torch.Tensor]:
    """Weighted average of experts (each a list of tensors in the same order, e.g. [gate, up, down]); the first is
    the base. With `align`, each other expert's neurons are first permuted to match the base's (a permutation of
    an expert's neurons does not change its function), so that corresponding neurons are averaged."""
    base = experts[0]
    if len(experts) == 1:
        return list(base)
    out = [t.to(compute_dtype(t)) * weights[0] for t in base]
    for member, w in zip(experts[1:], weights[1:]):
        if align:
            perm = match_neurons(neuron_features(base, neuron_dims), neuron_features(member, neuron_dims))
            member = [t.index_select(d, perm) for t, d in zip(member, neuron_dims)]
        out = [acc + t.to(acc.dtype) * w for acc, t in zip(out, member)]
    return [acc.to(t.dtype) for acc, t in zip(out, base)]


def merge_rows(t: torch.Tensor, dim: int, slots: Sequence[ExpertSlot], mode: str) -> torch.Tensor:
    """Router rows per expert slot: the base's row ("keep") or the slot's weighted average ("average")."""
    if mode not in ("keep", "average"):
        raise ValueError(f"router mode must be 'keep' or 'average', got {mode!r}")
    x = t.movedim(dim, 0)
    rows = []
    for slot in slots:
        if mode == "keep" or len(slot) == 1:
            rows.append(x[slot[0][0]])
        else:
            rows.append(sum(x[e].to(compute_dtype(t)) * w for e, w in slot).to(t.dtype))
    return torch.stack(rows).movedim(0, dim)
