"""The student target: sizes and planning options (from YAML and/or CLI flags), validated against the source model
before any importance file is read, so a bad target fails in a second with every problem named.

Sizes left out (None) keep the source's value. Attention is pruned by whole query groups (each keeps all its query
heads) and Gated DeltaNet by key heads (each keeps its value heads), so head dimensions never change.

Hybrid rule (Qwen3-Next's linear/full attention interleave): depth pruning keeps the source's ratio of full-attention
to Gated DeltaNet layers exactly, choosing the kept layers of each kind separately. `num_layers` must therefore be a
multiple of n / gcd(n, n_full) (48 layers with 12 full-attention ones: a multiple of 4), which also guarantees at
least one full-attention layer survives. MTP depths are full-attention MoE layers planned like decoder layers (same
expert count and widths as the student's decoder); `mtp_layers` keeps the first depths (0 drops MTP).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from megatron_slim.errors import UserError
from megatron_slim.models.config import ATTENTION, DENSE_MLP, GDN, ModelConfig
from megatron_slim.runtime.config_loader import load_yaml

EXPERT_CRITERIA = ("frequency", "soft_logits", "reap")
DEPTH_CRITERIA = ("block_influence", "loss_increase")
MERGE_SIMILARITIES = ("router_cosine", "coactivation")
ROUTERS = ("keep", "average")
CHOICES = {"expert_criterion": EXPERT_CRITERIA, "depth_criterion": DEPTH_CRITERIA,
           "merge_similarity": MERGE_SIMILARITIES, "router": ROUTERS}
SIZE_FIELDS = ("num_layers", "hidden_size", "num_experts", "topk", "moe_ffn_hidden_size",
               "shared_expert_ffn_hidden_size", "dense_ffn_hidden_size", "query_groups", "gdn_key_heads", "mtp_layers")


class TargetError(UserError, ValueError):
    """The target cannot be reached from this source (or is malformed)."""


@dataclass(frozen=True)
class TargetSpec:
    num_layers: int | None = None
    hidden_size: int | None = None
    num_experts: int | None = None
    topk: int | None = None
    moe_ffn_hidden_size: int | None = None
    shared_expert_ffn_hidden_size: int | None = None
    dense_ffn_hidden_size: int | None = None
    query_groups: int | None = None
    gdn_key_heads: int | None = None
    mtp_layers: int | None = None
    expert_criterion: str = "frequency"
    preserve_ratio: float = 0.5  # share of the target expert slots kept intact (the rest are merge bases)
    depth_criterion: str = "block_influence"
    merge_similarity: str = "router_cosine"
    router: str = "keep"
    tp: int = 1  # parallel sizes the student must fit (divisibility checks only)
    ep: int = 1
    pp: int = 1

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "target") -> "TargetSpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TargetError(f"{where}: unknown keys {unknown}; allowed: {sorted(known)}")
        for key, value in d.items():
            if value is None:
                continue
            if key == "preserve_ratio":
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            elif key in CHOICES:
                ok = isinstance(value, str)
            else:
                ok = isinstance(value, int) and not isinstance(value, bool)
            if not ok:
                raise TargetError(f"{where}: {key} has the wrong type ({value!r})")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TargetSpec":
        data = load_yaml(path) or {}
        if not isinstance(data, dict):
            raise TargetError(f"{path}: expected a mapping of target fields")
        return cls.from_dict(data, where=str(path))

    @classmethod
    def of_config(cls, source: ModelConfig, target: ModelConfig) -> "TargetSpec":
        """The sizes a student config `target` states, as a spec against `source` (a plan's target, checked by
        `prune` with the same `validate` as `plan` applies to the request); sizes of blocks the source lacks are
        left out, as a request would."""
        return cls(num_layers=target.num_layers, hidden_size=target.hidden_size, num_experts=target.num_experts,
                   topk=target.topk, moe_ffn_hidden_size=target.moe_ffn_hidden_size,
                   shared_expert_ffn_hidden_size=(target.shared_expert_ffn_hidden_size
                                                  if source.shared_expert_ffn_hidden_size else None),
                   dense_ffn_hidden_size=(target.dense_ffn_hidden_size if DENSE_MLP in source.mlp_types else None),
                   query_groups=target.num_query_groups,
                   gdn_key_heads=target.linear_num_key_heads if source.has_gdn else None,
                   mtp_layers=target.mtp_num_layers)

    def with_overrides(self, **overrides: Any) -> "TargetSpec":
        """Command-line flags over the YAML: None means 'not given'."""
        given = {k: v for k, v in overrides.items() if v is not None}
        TargetSpec.from_dict(given, where="flags")  # same key and type checks as the YAML
        return dataclasses.replace(self, **given)

    # ---- resolution against a source -------------------------------------------------------------------------
    def size(self, name: str, source_value: int) -> int:
        value = getattr(self, name)
        return source_value if value is None else value

    def heads_per_group(self, source: ModelConfig) -> int:
        return source.num_attention_heads // source.num_query_groups

    def value_heads_per_key_head(self, source: ModelConfig) -> int:
        return source.linear_num_value_heads // source.linear_num_key_heads if source.has_gdn else 0

    def layers_per_mixer(self, source: ModelConfig) -> dict[str, int]:
        """How many layers of each mixer kind the student keeps (the hybrid rule)."""
        n = self.size("num_layers", source.num_layers)
        n_full = source.mixer_types.count(ATTENTION)
        if not source.has_gdn:
            return {ATTENTION: n}
        return {ATTENTION: n * n_full // source.num_layers, GDN: n - n * n_full // source.num_layers}

    def validate(self, source: ModelConfig, layer_ratio: bool = True) -> None:
        """Raise one TargetError naming every problem; cheap, needs only the source config.

        `layer_ratio=False` drops the attention:linear-attention ratio rule, which binds a request (the planner
        keeps the ratio when it chooses layers) but not a plan whose layers were chosen by hand."""
        problems: list[str] = []
        sizes = {
            "num_layers": source.num_layers, "hidden_size": source.hidden_size, "num_experts": source.num_experts,
            "topk": source.topk, "moe_ffn_hidden_size": source.moe_ffn_hidden_size,
            "shared_expert_ffn_hidden_size": source.shared_expert_ffn_hidden_size,
            "dense_ffn_hidden_size": source.dense_ffn_hidden_size, "query_groups": source.num_query_groups,
            "gdn_key_heads": source.linear_num_key_heads, "mtp_layers": source.mtp_num_layers,
        }
        absent = {"shared_expert_ffn_hidden_size": (not source.shared_expert_ffn_hidden_size, "no shared expert"),
                  "dense_ffn_hidden_size": (DENSE_MLP not in source.mlp_types, "no dense MLP layers"),
                  "gdn_key_heads": (not source.has_gdn, "no Gated DeltaNet layers")}
        for name, src in sizes.items():
            value = getattr(self, name)
            if value is None:
                continue
            if name in absent and absent[name][0]:
                problems.append(f"{name}: the source has {absent[name][1]}")
            elif value < (0 if name == "mtp_layers" else 1):
                problems.append(f"{name}={value} must be >= {0 if name == 'mtp_layers' else 1}")
            elif value > src:
                problems.append(f"{name}={value} is larger than the source's {src} (targets only shrink)")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                problems.append(f"{name}={getattr(self, name)!r} is not one of {list(allowed)}")
        if not 0.0 <= self.preserve_ratio <= 1.0:
            problems.append(f"preserve_ratio={self.preserve_ratio} must be in [0, 1]")
        for name in ("tp", "ep", "pp"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if problems:  # later checks assume sane sizes
            raise TargetError("invalid target: " + "; ".join(problems))

        experts, topk = self.size("num_experts", source.num_experts), self.size("topk", source.topk)
        if topk > experts:
            problems.append(f"topk={topk} exceeds num_experts={experts}")
        n = self.size("num_layers", source.num_layers)
        n_full = source.mixer_types.count(ATTENTION)
        if layer_ratio and source.has_gdn and (n * n_full) % source.num_layers:
            step = source.num_layers // math.gcd(source.num_layers, n_full)
            problems.append(f"num_layers={n} breaks the source's {n_full}:{source.num_layers - n_full} "
                            f"full-attention:linear-attention ratio; use a multiple of {step}")
        problems += self._divisibility(source, n, experts)
        if problems:
            raise TargetError("invalid target: " + "; ".join(problems))

    def _divisibility(self, source: ModelConfig, n: int, experts: int) -> list[str]:
        tp, problems = self.tp, []
        groups = self.size("query_groups", source.num_query_groups)
        widths = {"num_attention_heads": groups * self.heads_per_group(source),
                  "moe_ffn_hidden_size": self.size("moe_ffn_hidden_size", source.moe_ffn_hidden_size),
                  "shared_expert_ffn_hidden_size": self.size("shared_expert_ffn_hidden_size",
                                                             source.shared_expert_ffn_hidden_size)}
        if DENSE_MLP in source.mlp_types:
            widths["dense_ffn_hidden_size"] = self.size("dense_ffn_hidden_size", source.dense_ffn_hidden_size)
        if source.has_gdn:
            key_heads = self.size("gdn_key_heads", source.linear_num_key_heads)
            widths["gdn_key_heads"] = key_heads
            widths["gdn_value_heads"] = key_heads * self.value_heads_per_key_head(source)
        problems += [f"{k}={v} is not divisible by tp={tp}" for k, v in widths.items() if v % tp]
        if groups % tp and tp % groups:  # megatron-core replicates groups when tp > groups
            problems.append(f"query_groups={groups} must divide or be a multiple of tp={tp}")
        if experts % self.ep:
            problems.append(f"num_experts={experts} is not divisible by ep={self.ep}")
        if n % self.pp:
            problems.append(f"num_layers={n} is not divisible by pp={self.pp}")
        return problems

    def target_config(self, source: ModelConfig, layers: list[int]) -> ModelConfig:
        """The student's ModelConfig when it keeps source decoder layers `layers` (in order)."""
        groups = self.size("query_groups", source.num_query_groups)
        key_heads = self.size("gdn_key_heads", source.linear_num_key_heads)
        return source.replace(
            num_layers=len(layers),
            hidden_size=self.size("hidden_size", source.hidden_size),
            num_attention_heads=groups * self.heads_per_group(source),
            num_query_groups=groups,
            num_experts=self.size("num_experts", source.num_experts),
            topk=self.size("topk", source.topk),
            moe_ffn_hidden_size=self.size("moe_ffn_hidden_size", source.moe_ffn_hidden_size),
            shared_expert_ffn_hidden_size=self.size("shared_expert_ffn_hidden_size",
                                                    source.shared_expert_ffn_hidden_size),
            # a student without dense layers keeps the source's (unused) width, as prune's plan check expects
            dense_ffn_hidden_size=(self.size("dense_ffn_hidden_size", source.dense_ffn_hidden_size)
                                   if any(source.mlp_types[i] == DENSE_MLP for i in layers)
                                   else source.dense_ffn_hidden_size),
            linear_num_key_heads=key_heads,
            linear_num_value_heads=key_heads * self.value_heads_per_key_head(source),
            mtp_num_layers=self.size("mtp_layers", source.mtp_num_layers),
            mixer_types=[source.mixer_types[i] for i in layers],
            mlp_types=[source.mlp_types[i] for i in layers],
        )

    def placeholder_layers(self, source: ModelConfig) -> list[int]:
        """Kept layers for accounting without importance: evenly spaced within each mixer kind (only the counts
        of each layer kind matter for the parameter count)."""
        kept: list[int] = []
        for mixer, k in self.layers_per_mixer(source).items():
            group = [i for i, m in enumerate(source.mixer_types) if m == mixer]
            kept += [group[j * len(group) // k] for j in range(k)]
        return sorted(kept)
