"""Check a CompressionPlan against the checkpoint it is applied to, before any byte is written.

Megatron-Core and HF configs describe uniform layers, so every kept layer must end up with the same number of
experts, neurons, query groups and GDN heads, and `plan.target` must state exactly those sizes: it becomes the
output checkpoint's config, and obey the rules `plan` checks a requested target against (`TargetSpec.validate`,
the one validator for both: an edited plan with top-k 0 used to prune into a non-functional MoE). Problems are
collected and reported together.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from megatron_slim.compress.plan import CompressionPlan, PlanError
from megatron_slim.compress.target import TargetError, TargetSpec
from megatron_slim.models.config import ATTENTION, DENSE_MLP, GDN, MOE, ModelConfig

# Target fields a plan may choose freely: they change no tensor shape.
FREE_FIELDS = ("topk", "norm_topk_prob", "router_aux_loss_coef", "initializer_range", "mtp_num_layers")


def kept_layers(plan: CompressionPlan) -> list[tuple[str, str, str]]:
    """(plan prefix, mixer type, MLP type) of every kept decoder layer and MTP depth, in student order."""
    src = plan.source
    out = [(f"layers.{i}", src.mixer_types[i], src.mlp_types[i]) for i in plan.layers]
    mixer, mlp = src.mtp_layer_pattern
    return out + [(f"mtp.{d}", mixer, mlp) for d in range(plan.target.mtp_num_layers)]


def _check_indices(name: str, idx: Sequence[int], n: int, problems: list[str]) -> None:
    if len(set(idx)) != len(idx) or any(not 0 <= i < n for i in idx):
        problems.append(f"{name}: indices must be unique and in [0, {n}), got {list(idx)[:16]}")


def _sizes(plan: CompressionPlan, problems: list[str]) -> dict[str, int]:
    """Validate every per-layer entry; return the student sizes they imply (uniform over layers)."""
    src, layers = plan.source, kept_layers(plan)
    kinds = {"experts": MOE, "expert_neurons": MOE, "shared_expert_neurons": MOE, "dense_mlp_neurons": DENSE_MLP,
             "query_groups": ATTENTION, "gdn_key_heads": GDN}
    for field, kind in kinds.items():
        for prefix in getattr(plan, field):
            if not any(p == prefix and kind in (mixer, mlp) for p, mixer, mlp in layers):
                problems.append(f"{field}[{prefix!r}]: not a kept layer with a {kind!r} block")
    seen: dict[str, set[int]] = {}

    def size(name: str, value: int) -> None:
        seen.setdefault(name, set()).add(value)

    def selection(field: str, prefix: str, n: int, name: str) -> None:
        """An optional per-layer index list (absent = keep all n): valid indices; its length is the new `name`."""
        keep = getattr(plan, field).get(prefix, range(n))
        _check_indices(f"{field}[{prefix!r}]", keep, n, problems)
        size(name, len(keep))

    for prefix, mixer, mlp in layers:
        if mlp == MOE:
            slots = plan.experts.get(prefix, [[(e, 1.0)] for e in range(src.num_experts)])
            for s, slot in enumerate(slots):
                members = [e for e, _ in slot]
                _check_indices(f"experts[{prefix!r}][{s}]", members, src.num_experts, problems)
                weights = [w for _, w in slot]
                if not members or not all(math.isfinite(w) and w > 0 for w in weights) or abs(sum(weights) - 1) > 1e-4:
                    problems.append(f"experts[{prefix!r}][{s}]: needs positive weights summing to 1, got {weights}")
            size("num_experts", len(slots))
            neurons = plan.expert_neurons.get(prefix)
            if neurons is not None:
                if len(neurons) != len(slots):
                    problems.append(f"expert_neurons[{prefix!r}]: {len(neurons)} lists for {len(slots)} expert slots")
                for s, keep in enumerate(neurons):
                    _check_indices(f"expert_neurons[{prefix!r}][{s}]", keep, src.moe_ffn_hidden_size, problems)
                    size("moe_ffn_hidden_size", len(keep))
            else:
                size("moe_ffn_hidden_size", src.moe_ffn_hidden_size)
            if src.shared_expert_ffn_hidden_size:
                selection("shared_expert_neurons", prefix, src.shared_expert_ffn_hidden_size,
                          "shared_expert_ffn_hidden_size")
        else:
            selection("dense_mlp_neurons", prefix, src.dense_ffn_hidden_size, "dense_ffn_hidden_size")
        if mixer == ATTENTION:
            selection("query_groups", prefix, src.num_query_groups, "num_query_groups")
        else:
            selection("gdn_key_heads", prefix, src.linear_num_key_heads, "linear_num_key_heads")
    out = {}
    for name, values in seen.items():
        if len(values) > 1:
            problems.append(f"{name}: kept layers would differ ({sorted(values)}); configs need uniform layers")
        out[name] = min(values)
    return out


def implied_target(plan: CompressionPlan, problems: list[str]) -> ModelConfig:
    """The student config the plan's selections produce (free fields taken from plan.target)."""
    src = plan.source
    _check_indices("layers", plan.layers, src.num_layers, problems)
    if plan.hidden_channels is not None:
        _check_indices("hidden_channels", plan.hidden_channels, src.hidden_size, problems)
    if plan.router not in ("keep", "average"):
        problems.append(f"router: must be 'keep' or 'average', got {plan.router!r}")
    if problems:  # the per-layer checks below index source layers with plan.layers
        return src
    sizes = _sizes(plan, problems)
    heads_per_group = src.num_attention_heads // src.num_query_groups
    sizes["num_attention_heads"] = sizes.get("num_query_groups", src.num_query_groups) * heads_per_group
    if src.linear_num_key_heads:
        value_per_key = src.linear_num_value_heads // src.linear_num_key_heads
        sizes["linear_num_value_heads"] = sizes.get("linear_num_key_heads", src.linear_num_key_heads) * value_per_key
    hidden = src.hidden_size if plan.hidden_channels is None else len(plan.hidden_channels)
    free = {f: getattr(plan.target, f) for f in FREE_FIELDS}
    return src.replace(num_layers=len(plan.layers), mixer_types=[src.mixer_types[i] for i in plan.layers],
                       mlp_types=[src.mlp_types[i] for i in plan.layers], hidden_size=hidden, **sizes, **free)


def check_plan(plan: CompressionPlan, checkpoint: ModelConfig) -> None:
    """Raise PlanError listing every way the plan does not fit `checkpoint` or its target misdescribes it."""
    problems = []
    fields = [f.name for f in dataclasses.fields(ModelConfig) if f.compare and f.name != "mtp_num_layers"]
    differ = [f for f in fields if getattr(plan.source, f) != getattr(checkpoint, f)]
    if differ:
        problems.append(f"plan.source differs from the checkpoint's config in {differ}")
    if plan.target.mtp_num_layers > checkpoint.mtp_num_layers:
        problems.append(f"target keeps {plan.target.mtp_num_layers} MTP layers, the checkpoint has "
                        f"{checkpoint.mtp_num_layers}")
    try:  # the target's sizes obey the rules `plan` applies to a request (top-k, counts, MTP depths), but its
        # layers are the plan's own choice, so the request's layer-type ratio does not bind
        TargetSpec.of_config(plan.source, plan.target).validate(plan.source, layer_ratio=False)
    except TargetError as e:
        problems.append(f"target: {str(e).removeprefix('invalid target: ')}")
    want = implied_target(plan, problems)
    if not problems:
        wrong = {f: (getattr(plan.target, f), getattr(want, f)) for f in fields if getattr(plan.target, f) !=
                 getattr(want, f)}
        problems += [f"target.{f} = {got!r}, the plan's selections give {need!r}" for f, (got, need) in wrong.items()]
    if problems:
        raise PlanError("compression plan does not fit:\n  " + "\n  ".join(problems))
