"""Writing a model produced group by group as HF-layout tensors, as an HF or a Megatron-Core checkpoint.

A producer (the pruner) hands out the tensors of each group of the target's mapping (embeddings, each layer, head,
each MTP depth) under their HF names, first on meta tensors, from which the writers plan the output (HFWriter and
the DCP writer need every shape up front, and the Megatron layout is checked against the plan), then for real.
The result lands in `<out>.partial`, renamed into place only when complete.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm import tqdm

from megatron_slim.checkpoint.files import HF_CONFIG, TOKENIZER_DIR, copy_side_files, staged
from megatron_slim.checkpoint.layout import LayoutCheck
from megatron_slim.checkpoint.mcore import MODEL_CONFIG
from megatron_slim.checkpoint.safetensors_io import HFWriter
from megatron_slim.checkpoint.source import rule_groups
from megatron_slim.models.config import ModelConfig
from megatron_slim.models.registry import hf_config_from

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Summary:
    tensors: int
    parameters: int
    active_parameters: int  # per token: all but the experts a token is not routed to
    bytes: int

    def describe(self) -> str:
        return (f"{self.tensors} tensors, {self.parameters / 1e9:.3f}B parameters "
                f"({self.active_parameters / 1e9:.3f}B active per token), {self.bytes / 2**30:.2f} GiB")


def summarize(cfg: ModelConfig, tensors: Tensors, is_expert: Callable[[str], bool]) -> Summary:
    params = sum(t.numel() for t in tensors.values())
    expert = sum(t.numel() for k, t in tensors.items() if is_expert(k))
    active = params - round(expert * (1 - cfg.topk / cfg.num_experts))
    return Summary(len(tensors), params, active, sum(t.numel() * t.element_size() for t in tensors.values()))


def is_mcore_expert(key: str) -> bool:
    """A routed-expert tensor under its Megatron-Core name."""
    return ".experts.experts." in key


def plan_mcore(cfg: ModelConfig, layout: LayoutCheck, groups: Iterable[tuple[str, Tensors]]
               ) -> tuple[Tensors, dict[str, int], Summary]:
    """Plan a Megatron-Core checkpoint from its groups of (meta) tensors, each with where it comes from (for layout
    errors): every tensor by key, the index of the group that makes each key (a writer asks for keys in its own
    order and produces the owning group then), and the summary."""
    planned: Tensors = {}
    owner: dict[str, int] = {}
    for idx, (source, tensors) in enumerate(groups):
        for key, t in tensors.items():
            layout.plan(key, tuple(t.shape), source)
            planned[key], owner[key] = t, idx
    return planned, owner, summarize(cfg, planned, is_mcore_expert)


@dataclass(frozen=True)
class GroupStream:
    """The model `cfg` describes, as `group(i, meta)`: the HF tensors of the i-th group of its mapping (on meta
    tensors: shapes and dtypes only), in the mapping's order (the order the writers stream them in)."""
    cfg: ModelConfig
    group: Callable[[int, bool], Tensors]
    side_files: Path  # the directory whose tokenizer and generation files travel with the weights
    desc: str  # progress bar label
    origin: str  # what the tensors are, for layout errors ("pruned" -> "pruned layer 3")

    def __len__(self) -> int:
        return len(rule_groups(self.cfg))


def write_hf(stream: GroupStream, out_dir: Path, *, overwrite: bool, dry_run: bool, progress: bool) -> Summary:
    n = len(stream)
    planned: Tensors = {}
    for idx in range(n):
        planned |= stream.group(idx, True)
    expert = re.compile(r".*\.experts\.\d+\.")
    summary = summarize(stream.cfg, planned, lambda k: bool(expert.match(k)))
    if dry_run:
        return summary
    with staged(out_dir, overwrite, [stream.side_files]) as tmp:
        writer = HFWriter(tmp, [(k, tuple(t.shape), t.dtype) for k, t in planned.items()])
        for idx in tqdm(range(n), desc=stream.desc, disable=not progress):
            for key, t in stream.group(idx, False).items():
                writer.write(key, t)
        writer.close()
        (tmp / HF_CONFIG).write_text(json.dumps(hf_config_from(stream.cfg), indent=2))
        copy_side_files(stream.side_files, tmp)
    return summary


def write_mcore(stream: GroupStream, out_dir: Path, *, overwrite: bool, dry_run: bool, progress: bool) -> Summary:
    target = stream.cfg
    groups = list(rule_groups(target).values())

    def to_mcore(idx: int, hf: Tensors) -> Tensors:
        out: Tensors = {}
        for rule in groups[idx]:
            out |= dict(zip(rule.mcore, rule.transform.to_mcore([hf[k] for k in rule.hf], target)))
        return out

    with LayoutCheck(target) as layout:  # computed by a child process while the groups stream
        planned, owner, summary = plan_mcore(target, layout, ((f"{stream.origin} {rules[0].where}",
                                                               to_mcore(idx, stream.group(idx, True)))
                                                              for idx, rules in enumerate(groups)))
        if dry_run:
            layout.objects()
            return summary
        cache: Tensors = {}
        bar = tqdm(total=len(groups), desc=stream.desc, disable=not progress)

        def produce(key: str) -> torch.Tensor:
            layout.poll()
            if key not in cache:
                cache.clear()
                cache.update(to_mcore(owner[key], stream.group(owner[key], False)))
                bar.update()
            return cache.pop(key)

        from megatron_slim.checkpoint.dcp_io import write_checkpoint  # DCP: seconds to import, write_hf skips it

        with staged(out_dir, overwrite, [stream.side_files]) as tmp:
            write_checkpoint(tmp, [(k, tuple(t.shape), t.dtype) for k, t in planned.items()], layout.objects,
                             produce)
            (tmp / MODEL_CONFIG).write_text(json.dumps(target.to_json(), indent=1))
            copy_side_files(stream.side_files, tmp / TOKENIZER_DIR)
        bar.close()
    return summary
