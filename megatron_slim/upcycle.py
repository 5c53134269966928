"""Upcycle a dense SwiGLU FFN into a Mixture of Experts by splitting its neurons (MoEfication), on plain tensors.

Construction, for a dense FFN `y = down @ (silu(gate @ x) * (up @ x))` with F neurons and E experts:

* The F neurons are split into E groups of F/E by balanced spherical k-means on the neurons' normalised
  [gate | up] rows, so neurons that read similar input directions (and so tend to fire together) share an expert.
* Expert e keeps its group's rows of `gate` and `up` and the matching columns of `down`, multiplied by
  `scale`. Because the SwiGLU is elementwise per neuron, the E unscaled experts sum to the dense FFN exactly.
* A Mixtral layer outputs `sum_{e in top-k} w_e * expert_e(x)`, where `w` is the softmax of the router logits
  renormalised over the k selected experts, so `sum w_e = 1`. Exactness at top-k = E is therefore only possible
  when every `w_e = 1/E` with `scale = E`: with split (non-identical) experts, non-uniform weights always reweight
  the neuron groups, whatever the scale. Selection, however, depends only on the ORDER of the logits, and the
  weights only on their SPREAD. So the router is fitted for order (logits predicting how much each expert
  contributes to the output for this token) and then shrunk by `router_scale` so the weights are uniform up to
  `O(router_scale)`: at top-k = E the MoE reproduces the dense FFN to that precision (exactly with
  `router_scale = 0`), and at top-k = k < E with `scale = k` it computes the dense FFN minus the neuron groups the
  router predicts to matter least for this token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class UpcycledFFN:
    """Experts in Mixtral layout (per expert: w1 = gate, w3 = up, w2 = down) plus the router."""

    gate: torch.Tensor  # [E, F/E, H]
    up: torch.Tensor  # [E, F/E, H]
    down: torch.Tensor  # [E, H, F/E]
    router: torch.Tensor  # [E, H]
    groups: torch.Tensor  # [E, F/E] dense neuron indices of each expert


def balanced_kmeans(points: torch.Tensor, num_clusters: int, seed: int = 0, iters: int = 30) -> torch.Tensor:
    """Cluster unit-norm rows into equal-size clusters by cosine similarity; returns labels [N].

    Equal sizes are what Mixtral needs (one intermediate size for all experts). Each assignment step is greedy
    over (point, centroid) pairs in order of decreasing similarity with a capacity of N / num_clusters per
    cluster; ties are broken by index, so the result depends only on `seed`.
    """
    n = points.shape[0]
    if n % num_clusters:
        raise ValueError(f"{n} points do not split into {num_clusters} equal clusters")
    capacity = n // num_clusters
    generator = torch.Generator().manual_seed(seed)
    centroids = _kmeans_plus_plus(points, num_clusters, generator)
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        new_labels = _capacitated_assign(points @ centroids.T, capacity)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
        sums = torch.zeros_like(centroids).index_add_(0, labels, points)
        centroids = F.normalize(sums, dim=1)
    return labels


def _kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    first = torch.randint(points.shape[0], (1,), generator=generator)
    chosen = [int(first)]
    distance = (1 - points @ points[chosen[0]]).clamp_min(0)
    for _ in range(1, k):
        weights = distance.double() if distance.sum() > 0 else torch.ones_like(distance, dtype=torch.double)
        nxt = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(nxt)
        distance = torch.minimum(distance, (1 - points @ points[nxt]).clamp_min(0))
    return points[chosen].clone()


def _capacitated_assign(similarity: torch.Tensor, capacity: int) -> torch.Tensor:
    n, k = similarity.shape
    order = torch.argsort(similarity.flatten(), descending=True, stable=True).tolist()
    labels = [-1] * n
    load = [0] * k
    remaining = n
    for flat in order:
        point, cluster = divmod(flat, k)
        if labels[point] < 0 and load[cluster] < capacity:
            labels[point] = cluster
            load[cluster] += 1
            remaining -= 1
            if remaining == 0:
                break
    return torch.tensor(labels, dtype=torch.long)


def split_neurons(gate: torch.Tensor, up: torch.Tensor, num_experts: int, seed: int = 0) -> torch.Tensor:
    """Partition the F neurons into `num_experts` equal groups; returns sorted indices [E, F/E].

    Gate and up rows are normalised separately before concatenation so both projections weigh equally.
    Experts are ordered by their smallest neuron index, which makes the output independent of cluster labels.
    """
    features = F.normalize(torch.cat([F.normalize(gate.float(), dim=1), F.normalize(up.float(), dim=1)], 1), dim=1)
    labels = balanced_kmeans(features, num_experts, seed=seed)
    groups = [torch.nonzero(labels == e).flatten() for e in range(num_experts)]
    groups.sort(key=lambda g: int(g[0]))
    return torch.stack(groups)


def expert_output_norms(hidden: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                        groups: torch.Tensor) -> torch.Tensor:
    """||expert_e(x)|| for each token and (unscaled) expert, [N, E]: how much the FFN output loses without e."""
    hidden = hidden.float()
    norms = []
    for idx in groups:
        act = F.silu(hidden @ gate[idx].float().T) * (hidden @ up[idx].float().T)
        norms.append(torch.linalg.vector_norm(act @ down[:, idx].float().T, dim=1))
    return torch.stack(norms, dim=1)


def fit_router(hidden: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Least-squares router [E, H] whose logits `hidden @ router.T` approximate per-token centred `targets`.

    Centring per token makes the fit ignore what softmax ignores (a per-token shift). The ridge term is relative
    to the mean eigenvalue of the hidden-state Gram matrix, so it does not depend on activation scale.
    """
    x = hidden.double()
    t = (targets - targets.mean(dim=1, keepdim=True)).double()
    gram = x.T @ x
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram, x.T @ t).T.float()


def upcycle_ffn(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, hidden: torch.Tensor, num_experts: int,
                top_k: int, router_scale: float = 1e-3, seed: int = 0) -> UpcycledFFN:
    """Split a dense SwiGLU FFN (gate [F,H], up [F,H], down [H,F]) into experts and fit its router.

    `hidden` [N, H] are calibration inputs to this FFN. Expert outputs are scaled by `top_k` so that the
    near-uniform routing weights (1/top_k each) add the selected neuron groups at their dense weight: the dense
    FFN at top-k = E, the dense FFN without the least useful groups below. The router logits are log expert output
    norms (centred) times `router_scale`; see the module docstring for why they are kept small.
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    groups = split_neurons(gate, up, num_experts, seed=seed)
    targets = torch.log(expert_output_norms(hidden, gate, up, down, groups) + 1e-6)
    router = fit_router(hidden, targets) * router_scale
    return UpcycledFFN(gate=gate[groups], up=up[groups], down=down[:, groups].permute(1, 0, 2) * top_k,
                       router=router, groups=groups)
