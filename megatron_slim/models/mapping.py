"""Declarative HF <-> Megatron-Core parameter mappings and their instantiation for one model.

A family declares its mapping as data (`FamilyMapping`: tables of `Rule`s per layer kind, like Megatron-Bridge);
`bind_rules` expands it over the model's layers, experts and MTP depths into concrete key lists. Keys on the
Megatron side are megatron-core's *global* sharded-checkpoint keys, which do not depend on TP/PP/EP.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from megatron_slim.models.config import ModelConfig
from megatron_slim.models.transforms import IDENTITY, Transform


@dataclass(frozen=True)
class Rule:
    mcore: tuple[str, ...]  # relative to the Megatron module prefix, produced together
    hf: tuple[str, ...]  # relative to the HF module prefix; "{e}" expands over experts (all e of one template first)
    transform: Transform = IDENTITY


@dataclass(frozen=True)
class FamilyMapping:
    head: list[Rule]  # before the layers (embeddings)
    mixers: dict[str, list[Rule]]  # per hybrid mixer symbol ('G', '*')
    mlps: dict[str, list[Rule]]  # per hybrid MLP symbol ('E', '-')
    tail: list[Rule]  # after the layers (final norm, untied output head)
    tied_tail: list[Rule]  # tail when embeddings and output head are tied
    mtp: list[Rule] = field(default_factory=list)  # per MTP depth, besides its inner layer
    hf_layer: str = "model.layers.{i}."
    hf_mtp: str = "mtp."  # HF prefix of the MTP-only tensors (fc, norms)
    hf_mtp_layer: str = "mtp.layers.{d}."


@dataclass(frozen=True)
class BoundRule:
    mcore: list[str]
    hf: list[str]
    transform: Transform
    where: str  # a human-readable location for errors and progress
    per_expert: bool = False  # its HF tensors are those of every routed expert (a `{e}` template)


def _expand(prefix: str, templates: tuple[str, ...], num_experts: int) -> list[str]:
    out = []
    for t in templates:
        out += [prefix + t.format(e=e) for e in range(num_experts)] if "{e}" in t else [prefix + t]
    return out


def _bind(rules: list[Rule], mc_prefix: str, hf_prefix: str, cfg: ModelConfig, where: str) -> list[BoundRule]:
    return [BoundRule([mc_prefix + m for m in r.mcore], _expand(hf_prefix, r.hf, cfg.num_experts), r.transform, where,
                      any("{e}" in t for t in r.hf)) for r in rules]


def bind_rules(mapping: FamilyMapping, cfg: ModelConfig) -> list[BoundRule]:
    """All rules for `cfg`, in checkpoint order (embeddings, layer by layer, head, MTP)."""
    bound = _bind(mapping.head, "", "", cfg, "embeddings")
    for i, (mixer, mlp) in enumerate(zip(cfg.mixer_types, cfg.mlp_types)):
        hf = mapping.hf_layer.format(i=i)
        bound += _bind(mapping.mixers[mixer], f"decoder.layers.{2 * i}.", hf, cfg, f"layer {i}")
        bound += _bind(mapping.mlps[mlp], f"decoder.layers.{2 * i + 1}.", hf, cfg, f"layer {i}")
    bound += _bind(mapping.tied_tail if cfg.tie_word_embeddings else mapping.tail, "", "", cfg, "head")
    mixer_sym, mlp_sym = cfg.mtp_layer_pattern
    for d in range(cfg.mtp_num_layers):
        mc, hf = f"mtp.layers.{d}.", mapping.hf_mtp_layer.format(d=d)
        bound += _bind(mapping.mtp, mc, mapping.hf_mtp, cfg, f"mtp {d}")
        bound += _bind(mapping.mixers[mixer_sym], mc + "mtp_model_layer.layers.0.", hf, cfg, f"mtp {d}")
        bound += _bind(mapping.mlps[mlp_sym], mc + "mtp_model_layer.layers.1.", hf, cfg, f"mtp {d}")
    return bound


def detect_mtp_layers(hf_keys: list[str], mapping: FamilyMapping) -> int:
    """HF configs declare no MTP depth count (and transformers drops `mtp.*` on load): count it from the keys."""
    pattern = re.compile(re.escape(mapping.hf_mtp_layer).replace(r"\{d\}", r"(\d+)"))
    depths = {int(m.group(1)) for k in hf_keys if (m := pattern.match(k))}
    if depths and depths != set(range(len(depths))):
        raise ValueError(f"MTP layers are not numbered 0..n-1: {sorted(depths)}")
    return len(depths)
