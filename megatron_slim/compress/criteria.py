"""How much the expert criteria disagree on one model: per MoE layer, the rank correlation of two criteria's
expert scores and whether they keep different experts. With every expert active on every token, routing frequency
is constant and cannot rank at all; this tells whether a comparison of criteria can mean anything on a model."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import torch

from megatron_slim.compress.importance_file import Importance, layer_prefix
from megatron_slim.models.config import MOE

CRITERIA = ("frequency", "soft_logits", "reap")


@dataclass(frozen=True)
class Agreement:
    """Two criteria over the MoE layers: mean Spearman correlation of their expert scores (nan where one criterion
    is constant over a layer's experts), and in how many layers their top-`keep` experts differ."""

    first: str
    second: str
    spearman: float
    layers_differing: int
    layers: int
    constant_layers: int  # layers where either criterion gives every expert the same score


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 with ties sharing their mean rank."""
    order = x.argsort(stable=True)
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    for value in x.unique():
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation; nan when either is constant."""
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = ra.norm() * rb.norm()
    return float((ra @ rb) / denom) if denom > 0 else float("nan")


def criteria_agreement(imp: Importance, keep: int) -> list[Agreement]:
    """Every pair of CRITERIA over the model's MoE decoder layers."""
    layers = [i for i, mlp in enumerate(imp.model.mlp_types) if mlp == MOE]
    out = []
    for a, b in combinations(CRITERIA, 2):
        rhos, differ, constant = [], 0, 0
        for i in layers:
            sa, sb = (imp.get(f"{layer_prefix(i)}experts.{c}").double() for c in (a, b))
            rho = spearman(sa, sb)
            if rho != rho:  # nan: a constant criterion ranks nothing
                constant += 1
            else:
                rhos.append(rho)
            top_a = set(sa.argsort(descending=True, stable=True)[:keep].tolist())
            top_b = set(sb.argsort(descending=True, stable=True)[:keep].tolist())
            differ += top_a != top_b
        out.append(Agreement(a, b, sum(rhos) / len(rhos) if rhos else float("nan"), differ, len(layers), constant))
    return out
