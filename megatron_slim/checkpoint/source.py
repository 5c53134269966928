"""Reading a checkpoint as HF-layout tensors, whatever its format, one mapping group at a time.

An HF checkpoint is validated against its config and family mapping from the headers alone
(`plan_hf_to_mcore`); a Megatron checkpoint is read through the mapping's `to_hf` transforms. Either way a reader
hands out the tensors of one group ("embeddings", "layer 3", "head", "mtp 0") under their HF names.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megatron_slim.checkpoint.files import Checkpoint, check_keys
from megatron_slim.checkpoint.hf_shapes import check_mapping_shapes, describe_mcore_mismatch, describe_mismatch
from megatron_slim.checkpoint.mcore import load_model_config
from megatron_slim.checkpoint.mcore_reader import McoreReader
from megatron_slim.checkpoint.safetensors_io import HFReader
from megatron_slim.errors import CheckpointError
from megatron_slim.models.config import ModelConfig, load_hf_config
from megatron_slim.models.mapping import BoundRule, bind_rules, detect_mtp_layers
from megatron_slim.models.registry import FAMILIES, family_of_hf, model_config_from_hf

Tensors = dict[str, torch.Tensor]


def plan_hf_to_mcore(hf_dir: str | Path) -> tuple[ModelConfig, list[BoundRule], HFReader]:
    """Validate an HF checkpoint against its config and the mapping (keys and shapes), reading headers only."""
    reader = HFReader(hf_dir)
    hf = load_hf_config(hf_dir)
    family = family_of_hf(hf)
    mtp = detect_mtp_layers(reader.keys(), family.mapping) if family.max_mtp_layers else 0
    cfg = model_config_from_hf(hf, mtp_num_layers=mtp)
    emb = reader.tensors.get("model.embed_tokens.weight")
    if emb is not None:
        cfg.hf_config["dtype"] = str(emb.dtype).replace("torch.", "")
    rules = bind_rules(family.mapping, cfg)
    consumed = [k for r in rules for k in r.hf]
    check_keys("HF", consumed, set(reader.keys()), str(hf_dir))
    unused = sorted(set(reader.keys()) - set(consumed))
    if unused:
        raise CheckpointError(f"{hf_dir}: {len(unused)} HF tensors are not consumed by the {cfg.family} mapping "
                              f"(nothing is dropped silently): {unused[:10]}")
    stored = {k: info.shape for k, info in reader.tensors.items()}
    check_mapping_shapes(Path(hf_dir), cfg, rules, stored, "hf", lambda: describe_mismatch(hf, stored))
    return cfg, rules, reader


def open_mcore(path: Path) -> tuple[ModelConfig, list[BoundRule], McoreReader]:
    """A Megatron checkpoint's config, bound mapping and reader, validated: every tensor the mapping needs is
    there with the shape the config implies (reading metadata only)."""
    cfg = load_model_config(path)
    reader = McoreReader(path)
    rules = bind_rules(FAMILIES[cfg.family].mapping, cfg)
    check_keys("Megatron", [k for r in rules for k in r.mcore], set(reader.tensors), str(path))
    stored = {k: shape for k, (shape, _) in reader.tensors.items()}
    check_mapping_shapes(path, cfg, rules, stored, "mcore", lambda: describe_mcore_mismatch(cfg, rules, stored))
    return cfg, rules, reader


def grouped(rules: list[BoundRule]) -> dict[str, list[BoundRule]]:
    """Bound rules by location, in checkpoint order."""
    groups: dict[str, list[BoundRule]] = {}
    for rule in rules:
        groups.setdefault(rule.where, []).append(rule)
    return groups


def rule_groups(cfg: ModelConfig) -> dict[str, list[BoundRule]]:
    """`cfg`'s family mapping bound to `cfg`, by location in checkpoint order."""
    return grouped(bind_rules(FAMILIES[cfg.family].mapping, cfg))


class Source:
    """A checkpoint read as HF-layout tensors, grouped by mapping location ("embeddings", "layer 3", "mtp 0")."""

    def __init__(self, path: Path) -> None:
        ckpt = Checkpoint.open(path)
        if ckpt.kind == "mcore":
            self.cfg, rules, self._mcore = open_mcore(path)
            self.side_files = ckpt.tokenizer_files
        else:
            self.cfg, rules, self._hf = plan_hf_to_mcore(path)
            self._mcore = None
            self.side_files = path
        self.groups = grouped(rules)

    def prefetch(self, where: str) -> None:
        """Start reading a group into the page cache, so its reads overlap the current group's work."""
        for rule in self.groups[where]:
            if self._mcore is None:
                self._hf.prefetch(rule.hf)
            else:
                self._mcore.prefetch(rule.mcore)

    def read(self, where: str, meta: bool) -> Tensors:
        out: Tensors = {}
        for rule in self.groups[where]:
            out |= self.read_rule(rule, meta)
        return out

    def read_rule(self, rule: BoundRule, meta: bool = False) -> Tensors:
        """The HF tensors of one rule (on meta tensors: shapes and dtypes only)."""
        if self._mcore is None:
            return {k: self._hf.meta(k) if meta else self._hf.read(k) for k in rule.hf}
        if meta:
            specs = rule.transform.hf_specs([self._mcore.tensors[k] for k in rule.mcore], self.cfg)
            return {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in zip(rule.hf, specs)}
        return dict(zip(rule.hf, rule.transform.to_hf(self._mcore.read(rule.mcore), self.cfg)))
