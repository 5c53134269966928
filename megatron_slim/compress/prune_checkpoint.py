"""Apply a CompressionPlan to a checkpoint, streaming one layer at a time: `megatron-slim prune`.

Surgery always sees HF-layout tensors, whatever the input format (`checkpoint.source` reads either). Each student
layer is cut from its source layer by the family's surgery table (its registered `Family.surgery`) and the
operations in `surgery.py`; `checkpoint.writers` plans the output on meta tensors and writes it as HF safetensors
or a Megatron-Core checkpoint. Memory holds one layer's tensors (source and pruned) plus I/O buffers.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_slim.checkpoint.fingerprint import VERSION, VERSIONS, model_fingerprint
from megatron_slim.checkpoint.source import Source, rule_groups
from megatron_slim.checkpoint.writers import GroupStream, Summary, write_hf, write_mcore
from megatron_slim.compress import surgery
from megatron_slim.compress.plan import CompressionPlan, ExpertSlot, PlanError
from megatron_slim.compress.plan_check import check_plan
from megatron_slim.errors import CheckpointError
from megatron_slim.models.config import ModelConfig
from megatron_slim.models.registry import FAMILIES
from megatron_slim.models.surgery_spec import (
    DENSE_NEURONS,
    EXPERT_NEURONS,
    EXPERTS,
    GDN_KEY_HEADS,
    HIDDEN,
    QUERY_GROUPS,
    SHARED_NEURONS,
    SurgerySpec,
    TensorSpec,
    units,
)

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Options:
    align_neurons: bool = False  # permute merged experts' neurons to match the base's before averaging
    rescale_norms: bool = True  # compensate RMSNorm gains for the pruned hidden channels (see surgery.rescale_norm)


@dataclass(frozen=True)
class Selection:
    """What one layer (or the embeddings/head) keeps: per axis the source units (None: all), and expert slots."""
    keep: dict[str, list[int] | None]
    slots: list[ExpertSlot] | None = None
    slot_neurons: list[list[int]] | None = None
    router: str = "keep"


def selection(plan: CompressionPlan, prefix: str | None) -> Selection:
    """The plan's choices for the layer with plan prefix `prefix` (None: embeddings and head, hidden only)."""
    keep: dict[str, list[int] | None] = {HIDDEN: plan.hidden_channels}
    if prefix is None:
        return Selection(keep)
    keep |= {QUERY_GROUPS: plan.query_groups.get(prefix), GDN_KEY_HEADS: plan.gdn_key_heads.get(prefix),
             SHARED_NEURONS: plan.shared_expert_neurons.get(prefix), DENSE_NEURONS: plan.dense_mlp_neurons.get(prefix)}
    return Selection(keep, plan.experts.get(prefix), plan.expert_neurons.get(prefix), plan.router)


def _apply_dims(t: torch.Tensor, spec: TensorSpec, cfg: ModelConfig, keep: dict[str, list[int] | None],
                sel: Selection, opts: Options) -> torch.Tensor:
    for d in spec.dims:
        if d.axis == EXPERTS:
            if sel.slots is not None:
                t = surgery.merge_rows(t, d.dim, sel.slots, sel.router)
        elif keep.get(d.axis) is not None:
            t = surgery.select_units(t, d.dim, keep[d.axis], units(cfg, d.axis),
                                     d.sections(cfg) if d.sections else None)
    hidden = keep.get(HIDDEN)
    if spec.norm and hidden is not None and opts.rescale_norms:
        t = surgery.rescale_norm(t, len(hidden), cfg.hidden_size, cfg.zero_centered_norm)
    return t


def spec_for(spec: SurgerySpec, name: str) -> tuple[str, int | None]:
    """(table entry, expert index or None) of a tensor name relative to its layer (or absolute outside layers)."""
    if name in spec.tensors:
        return name, None
    for entry in spec.tensors:
        if "{e}" in entry and (m := re.fullmatch(re.escape(entry).replace(r"\{e\}", r"(\d+)"), name)):
            return entry, int(m.group(1))
    raise CheckpointError(f"no surgery rule for tensor {name!r}")


def prune_layer(tensors: Tensors, spec: SurgerySpec, cfg: ModelConfig, sel: Selection,
                opts: Options = Options()) -> Tensors:
    """Prune one layer's HF tensors (names relative to the layer, or absolute outside layers; `cfg` = source).

    Expert slots are merged first, in the source neuron space; neuron, head, group and channel selections follow
    (they act on different dimensions, so their order does not matter). Output experts are numbered by slot."""
    experts: dict[str, dict[int, torch.Tensor]] = {}
    out: Tensors = {}
    for name, t in tensors.items():
        entry, e = spec_for(spec, name)
        if e is None:
            out[name] = _apply_dims(t, spec.tensors[name], cfg, sel.keep, sel, opts)
        else:
            experts.setdefault(entry, {})[e] = t
    if not experts:
        return out
    templates = list(experts)
    neuron_dims = [next(d.dim for d in spec.tensors[tpl].dims if d.axis == EXPERT_NEURONS) for tpl in templates]
    slots = sel.slots if sel.slots is not None else [[(e, 1.0)] for e in range(cfg.num_experts)]
    for s, slot in enumerate(slots):
        members = [[experts[tpl][e] for tpl in templates] for e, _ in slot]
        merged = surgery.merge_experts(members, [w for _, w in slot], neuron_dims,
                                       align=opts.align_neurons and not members[0][0].is_meta)
        keep = sel.keep | {EXPERT_NEURONS: sel.slot_neurons[s] if sel.slot_neurons is not None else None}
        for tpl, t in zip(templates, merged):
            out[tpl.format(e=s)] = _apply_dims(t, spec.tensors[tpl], cfg, keep, sel, opts)
    return out


@dataclass(frozen=True)
class _Job:
    """One student group: which source group it is cut from, and how names move."""
    where: str  # target group
    source: str  # source group
    src_prefix: str  # HF layer prefix in the source ("" outside layers)
    dst_prefix: str
    selection: Selection


def _jobs(plan: CompressionPlan, target_groups: list[str]) -> list[_Job]:
    mapping = FAMILIES[plan.source.family].mapping
    jobs = []
    for where in target_groups:
        kind, _, idx = where.partition(" ")
        if kind == "layer":
            i, j = plan.layers[int(idx)], int(idx)
            jobs.append(_Job(where, f"layer {i}", mapping.hf_layer.format(i=i), mapping.hf_layer.format(i=j),
                             selection(plan, f"layers.{i}")))
        elif kind == "mtp":
            prefix = mapping.hf_mtp_layer.format(d=int(idx))
            jobs.append(_Job(where, where, prefix, prefix, selection(plan, f"mtp.{idx}")))
        else:
            jobs.append(_Job(where, where, "", "", selection(plan, None)))
    return jobs


class Pruner:
    """Runs the plan's jobs against a source, producing each student group's HF tensors in the order of the target
    mapping (the order both writers stream them in)."""

    def __init__(self, plan: CompressionPlan, source: Source, opts: Options) -> None:
        self.source, self.opts = source, opts
        self.spec = FAMILIES[plan.source.family].surgery
        self.target = plan.target.replace(hf_config={**source.cfg.hf_config, **plan.target.hf_config})
        self.target_groups = rule_groups(self.target)
        self.jobs = _jobs(plan, list(self.target_groups))

    def group(self, idx: int, meta: bool = False) -> Tensors:
        """The student HF tensors of job `idx` (on meta tensors: shapes and dtypes only)."""
        job = self.jobs[idx]
        src = self.source.read(job.source, meta)
        if not meta and idx + 1 < len(self.jobs):
            self.source.prefetch(self.jobs[idx + 1].source)
        n = len(job.src_prefix)
        absolute = {k for k in src if not (n and k.startswith(job.src_prefix))}  # e.g. mtp.fc beside mtp.layers.0
        rel = {(k if k in absolute else k[n:]): t for k, t in src.items()}
        pruned = prune_layer(rel, self.spec, self.source.cfg, job.selection, self.opts)
        out = {(k if k in absolute else job.dst_prefix + k): t for k, t in pruned.items()}
        want = [k for rule in self.target_groups[job.where] for k in rule.hf]
        if set(out) != set(want):
            raise CheckpointError(f"{job.where}: surgery produced {sorted(set(out) - set(want))[:8]}, the target "
                                  f"mapping expects {sorted(set(want) - set(out))[:8]}")
        return {k: out[k] for k in want}


def check_source_model(plan: CompressionPlan, in_dir: Path, allow_other_model: bool = False) -> None:
    """The plan was computed on the weights of `in_dir` (its fingerprint, `checkpoint/fingerprint.py`), unless
    `allow_other_model`. A plan without a fingerprint (written before plans carried one) is applied with a warning:
    `check_plan` still ensures that its config matches, and refusing it would mean recollecting the importance
    (hours at scale) for plans that are almost always applied to the model they were made for."""
    if plan.source_fingerprint is None:
        print(f"warning: the plan carries no fingerprint of the model it was computed on (written by an older "
              f"version): cannot check that it was made for the weights of {in_dir}", file=sys.stderr)
        return
    if allow_other_model:
        return
    version = plan.source_fingerprint.split(":", 1)[0]
    if version not in VERSIONS:
        raise PlanError(f"the plan's source_fingerprint {plan.source_fingerprint!r} is of an unknown version (this "
                        f"version knows {', '.join(VERSIONS)}); pass --allow-other-model to apply it unchecked")
    if version != VERSION:
        print(f"warning: the plan carries a {version} fingerprint, which does not cover the embeddings and output "
              f"layer of {in_dir}; recompute importance and plan to check them too", file=sys.stderr)
    found = model_fingerprint(in_dir, version)
    if found != plan.source_fingerprint:
        raise PlanError(f"the plan was computed on another model than {in_dir}: same config, other weights "
                        f"(fingerprint {plan.source_fingerprint}, {in_dir} has {found}); run importance and plan on "
                        "this model, or pass --allow-other-model to apply the plan anyway (e.g. one computed on a "
                        "base model, applied to its fine-tune)")


def prune_checkpoint(plan: CompressionPlan, in_dir: str | Path, out_dir: str | Path, out_format: str = "hf", *,
                     opts: Options = Options(), overwrite: bool = False, dry_run: bool = False,
                     progress: bool = True, allow_other_model: bool = False) -> Summary:
    """Write the student checkpoint `plan` describes, cut from `in_dir` (HF or Megatron), as `out_format`; the
    plan must have been computed on `in_dir`'s weights unless `allow_other_model` (`check_source_model`)."""
    if out_format not in ("hf", "mcore"):
        raise ValueError(f"out_format must be 'hf' or 'mcore', got {out_format!r}")
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    source = Source(in_dir)
    check_plan(plan, source.cfg)
    check_source_model(plan, in_dir, allow_other_model)
    pruner = Pruner(plan, source, opts)
    stream = GroupStream(pruner.target, pruner.group, source.side_files, desc="prune", origin="pruned")
    write = write_hf if out_format == "hf" else write_mcore
    return write(stream, out_dir, overwrite=overwrite, dry_run=dry_run, progress=progress)


