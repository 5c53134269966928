"""The compression plan: exactly what a pruned/merged student keeps, as indices into the source model.

Written by `megatron-slim plan`, applied by `megatron-slim prune`. Plain JSON so people can read and edit it.
Every index refers to the SOURCE model. Per-layer entries are keyed by the source layer's prefix
(`layers.{i}` for decoder layers, `mtp.{d}` for MTP depths) and exist only for kept layers.

- layers: kept source decoder layers, in order (the student's layer j is source layer layers[j]).
- hidden_channels: kept hidden channels (sorted), or None to keep all.
- experts[prefix]: one entry per student expert slot: a list of [source_expert, weight] pairs. An intact (kept)
  expert is [[e, 1.0]]; a merged slot lists its base first, then the experts merged into it; weights sum to 1.
- router: "keep" (a merged slot keeps its base's router row) or "average" (the same weighted average as its FFN).
- expert_neurons[prefix]: per student expert slot, kept FFN neurons (indices into the merged expert's neurons,
  i.e. the base's neuron order), or absent to keep all.
- shared_expert_neurons[prefix] / dense_mlp_neurons[prefix]: kept neurons, or absent.
- query_groups[prefix]: kept attention query groups (with all their heads), or absent.
- gdn_key_heads[prefix]: kept Gated DeltaNet key heads (with their value heads), or absent.
- target: the student's ModelConfig (what `prune` writes into the output checkpoint).
- source_fingerprint: the fingerprint of the weights the importance was collected on (`checkpoint/fingerprint.py`),
  which `prune` compares with its input's; None in plans of older versions (then `prune` warns that it cannot
  check).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from megatron_slim.errors import UserError
from megatron_slim.models.config import ModelConfig

ExpertSlot = list[tuple[int, float]]


class PlanError(UserError, ValueError):
    """A compression plan does not fit the checkpoint, or its target config does not describe what it keeps."""


@dataclass
class CompressionPlan:
    source: ModelConfig
    target: ModelConfig
    layers: list[int]
    hidden_channels: list[int] | None = None
    experts: dict[str, list[ExpertSlot]] = field(default_factory=dict)
    router: str = "keep"
    expert_neurons: dict[str, list[list[int]]] = field(default_factory=dict)
    shared_expert_neurons: dict[str, list[int]] = field(default_factory=dict)
    dense_mlp_neurons: dict[str, list[int]] = field(default_factory=dict)
    query_groups: dict[str, list[int]] = field(default_factory=dict)
    gdn_key_heads: dict[str, list[int]] = field(default_factory=dict)
    source_fingerprint: str | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["source"], d["target"] = self.source.to_json(), self.target.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict, where: str = "plan") -> "CompressionPlan":
        """Parse a plan; unknown or missing keys and malformed expert slots are a PlanError naming `where`.
        (Whether the plan fits a checkpoint is `plan_check.check_plan`'s question.)"""
        if not isinstance(d, dict):
            raise PlanError(f"{where}: expected a JSON object")
        names = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(d) - names), sorted({"source", "target", "layers"} - set(d))
        if unknown or missing:
            parts = ([f"unknown keys {unknown} (known: {sorted(names)})"] if unknown else []) + \
                ([f"missing keys {missing}"] if missing else [])
            raise PlanError(f"{where}: " + "; ".join(parts))
        d = dict(d)
        try:
            d["source"] = ModelConfig.from_json(d["source"], f"{where}: source")
            d["target"] = ModelConfig.from_json(d["target"], f"{where}: target")
        except UserError as e:
            raise PlanError(str(e)) from None
        try:
            d["experts"] = {k: [[(int(e), float(w)) for e, w in slot] for slot in v]
                            for k, v in d.get("experts", {}).items()}
        except (TypeError, ValueError, AttributeError):
            raise PlanError(f"{where}: experts must map a layer to slots of [expert, weight] pairs") from None
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "CompressionPlan":
        try:
            data = json.loads(Path(path).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PlanError(f"{path}: not valid JSON ({e})") from None
        return cls.from_json(data, str(path))
