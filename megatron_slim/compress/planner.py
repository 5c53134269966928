"""Importance statistics + target -> CompressionPlan.

Deterministic: every ranking is a stable sort on (-score, index), so equal scores favour the lower index, and every
kept index list is returned sorted. What is ranked by what:
- depth: `layers.{i}.block_influence` or `.loss_increase`, separately per mixer kind (the hybrid rule, see target.py);
- hidden channels: `hidden.channels`;
- experts (partial preservation): rank by the expert criterion; of the E' slots the top round(p*E') (half up) stay
  intact, the next E' - round(p*E') are merge bases, and every other expert joins its most similar base (router
  cosine or co-activation; ties to the lower base index) with weight proportional to its score within the slot
  (zero-score experts are left out; uniform when all of a slot's scores are zero). p=1 is plain pruning, p=0
  makes every slot a base;
- expert FFN neurons per slot by the base's `experts.neurons` row; shared-expert and dense-MLP neurons, attention
  query groups and GDN key heads (sum of `gdn.heads` over the key head's value heads) by their own statistics.
MTP depths are planned like decoder MoE/attention layers, from their own `mtp.{d}.` statistics.
"""
from __future__ import annotations

import math

import torch

from megatron_slim.compress.importance_file import Importance, layer_prefix
from megatron_slim.compress.plan import CompressionPlan, ExpertSlot
from megatron_slim.compress.target import TargetSpec
from megatron_slim.errors import UserError
from megatron_slim.models.config import ATTENTION, DENSE_MLP, GDN, MOE, ModelConfig


class ImportanceError(UserError, ValueError):
    """The importance file lacks statistics the target needs, or holds unusable ones."""


def top_k(scores: list[float], k: int) -> list[int]:
    """Indices of the k highest scores in ranking order (ties: lower index first)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def kept(scores: list[float], k: int) -> list[int]:
    return sorted(top_k(scores, k))


class _Stats:
    """Shape- and value-checked access to the importance tensors. Missing names are collected (planning continues
    on zeros) so that one error can list everything the file lacks."""

    def __init__(self, imp: Importance) -> None:
        self.tensors = imp.tensors
        self.missing: list[str] = []

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = self.tensors.get(name)
        if t is None:
            self.missing.append(name)
            return torch.zeros(shape, dtype=torch.float64)
        if tuple(t.shape) != shape:
            raise ImportanceError(f"importance tensor {name} has shape {list(t.shape)}, expected {list(shape)} "
                                  "for this model")
        if not torch.isfinite(t).all():
            raise ImportanceError(f"importance tensor {name} holds non-finite values")
        return t.double()

    def vector(self, name: str, n: int) -> list[float]:
        return self.tensor(name, (n,)).tolist()

    def check_complete(self) -> None:
        if not self.missing:
            return
        hint = (" (loss_increase is collected with `megatron-slim importance --layer-loss`)"
                if any(m.endswith("loss_increase") for m in self.missing) else "")
        shown = ", ".join(self.missing[:6]) + (f" and {len(self.missing) - 6} more" if len(self.missing) > 6 else "")
        raise ImportanceError(f"the importance file lacks statistics this target needs: {shown}{hint}")


def select_layers(stats: _Stats, src: ModelConfig, spec: TargetSpec) -> list[int]:
    n = spec.size("num_layers", src.num_layers)
    if n == src.num_layers:
        return list(range(n))
    scores = [stats.vector(f"{layer_prefix(i)}{spec.depth_criterion}", 1)[0] for i in range(src.num_layers)]
    chosen: list[int] = []
    for mixer, k in spec.layers_per_mixer(src).items():
        group = [i for i, m in enumerate(src.mixer_types) if m == mixer]
        chosen += [group[j] for j in top_k([scores[i] for i in group], k)]
    return sorted(chosen)


def intact_count(preserve_ratio: float, n_slots: int) -> int:
    """round(p * E') with halves rounded up (Python's round() would round 2.5 to 2)."""
    return math.floor(preserve_ratio * n_slots + 0.5)


def merge_weights(members: list[int], scores: list[float]) -> ExpertSlot:
    """Importance-weighted merge of `members` (base first); weights sum to 1. A zero-score member would get weight 0
    and is left out (the base outranks its members, so it always stays); an all-zero slot merges uniformly."""
    total = sum(scores[e] for e in members)
    if total <= 0:
        return [(e, 1.0 / len(members)) for e in members]
    return [(e, scores[e] / total) for e in members if scores[e] > 0]


def plan_expert_slots(scores: list[float], similarity: torch.Tensor | None, n_slots: int,
                      preserve_ratio: float) -> list[ExpertSlot]:
    """Partial preservation for one MoE layer; slots are ordered by their first (intact or base) expert."""
    ranked = top_k(scores, len(scores))
    n_intact = intact_count(preserve_ratio, n_slots)
    intact, bases, rest = ranked[:n_intact], ranked[n_intact:n_slots], ranked[n_slots:]
    members: dict[int, list[int]] = {b: [] for b in bases}
    if bases and rest:
        assert similarity is not None
        sim = similarity.tolist()
        for e in rest:
            members[max(bases, key=lambda b: (sim[e][b], -b))].append(e)
    slots = [[(e, 1.0)] for e in intact] + [merge_weights([b] + sorted(members[b]), scores) for b in bases]
    return sorted(slots, key=lambda slot: slot[0][0])


def _plan_moe(plan: CompressionPlan, stats: _Stats, key: str, prefix: str, spec: TargetSpec) -> None:
    src, tgt = plan.source, plan.target
    e, e2, f, f2 = src.num_experts, tgt.num_experts, src.moe_ffn_hidden_size, tgt.moe_ffn_hidden_size
    if e2 == e:
        slots: list[ExpertSlot] = [[(i, 1.0)] for i in range(e)]
    else:
        scores = stats.vector(f"{prefix}experts.{spec.expert_criterion}", e)
        if min(scores) < 0:
            raise ImportanceError(f"{prefix}experts.{spec.expert_criterion} has negative scores")
        has_bases = intact_count(spec.preserve_ratio, e2) < e2
        sim = stats.tensor(f"{prefix}experts.{spec.merge_similarity}", (e, e)) if has_bases else None
        slots = plan_expert_slots(scores, sim, e2, spec.preserve_ratio)
    plan.experts[key] = slots
    if f2 < f:
        neurons = stats.tensor(f"{prefix}experts.neurons", (e, f))
        plan.expert_neurons[key] = [kept(neurons[slot[0][0]].tolist(), f2) for slot in slots]
    fs, fs2 = src.shared_expert_ffn_hidden_size, tgt.shared_expert_ffn_hidden_size
    if fs2 < fs:
        plan.shared_expert_neurons[key] = kept(stats.vector(f"{prefix}shared_expert.neurons", fs), fs2)


def _plan_mixer(plan: CompressionPlan, stats: _Stats, key: str, prefix: str, mixer: str) -> None:
    src, tgt = plan.source, plan.target
    if mixer == ATTENTION and tgt.num_query_groups < src.num_query_groups:
        scores = stats.vector(f"{prefix}attention.query_groups", src.num_query_groups)
        plan.query_groups[key] = kept(scores, tgt.num_query_groups)
    elif mixer == GDN and tgt.linear_num_key_heads < src.linear_num_key_heads:
        hk = src.linear_num_key_heads
        heads = stats.tensor(f"{prefix}gdn.heads", (src.linear_num_value_heads,))
        per_key = heads.view(hk, -1).sum(dim=1).tolist()  # value head v belongs to key head v // (Hv / Hk)
        plan.gdn_key_heads[key] = kept(per_key, tgt.linear_num_key_heads)


def make_plan(imp: Importance, spec: TargetSpec) -> CompressionPlan:
    """The plan reaching `spec` from the model `imp` describes; raises TargetError / ImportanceError, never plans
    half-way on missing statistics."""
    src = imp.model
    spec.validate(src)
    stats = _Stats(imp)
    layers = select_layers(stats, src, spec)
    plan = CompressionPlan(source=src, target=spec.target_config(src, layers), layers=layers, router=spec.router,
                           source_fingerprint=imp.fingerprint)
    h2 = plan.target.hidden_size
    if h2 < src.hidden_size:
        plan.hidden_channels = kept(stats.vector("hidden.channels", src.hidden_size), h2)
    blocks = [(layer_prefix(i), src.mixer_types[i], src.mlp_types[i]) for i in layers]
    mtp_mixer, mtp_mlp = src.mtp_layer_pattern
    blocks += [(layer_prefix(mtp_depth=d), mtp_mixer, mtp_mlp) for d in range(plan.target.mtp_num_layers)]
    for prefix, mixer, mlp in blocks:
        key = prefix.rstrip(".")
        _plan_mixer(plan, stats, key, prefix, mixer)
        if mlp == MOE:
            _plan_moe(plan, stats, key, prefix, spec)
        elif mlp == DENSE_MLP and plan.target.dense_ffn_hidden_size < src.dense_ffn_hidden_size:
            scores = stats.vector(f"{prefix}dense_mlp.neurons", src.dense_ffn_hidden_size)
            plan.dense_mlp_neurons[key] = kept(scores, plan.target.dense_ffn_hidden_size)
    stats.check_complete()
    return plan
