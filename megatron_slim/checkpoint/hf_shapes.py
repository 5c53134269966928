"""Checking that a checkpoint's stored shapes are those its config implies, before anything is written.

`check_mapping_shapes` takes every mapping rule's stored shapes through its transform's shape functions (no data
read, no tensors made), from the stored side to the other and back: a config that disagrees with its weights (say
`hidden_size` or `head_dim` edited by hand) makes a reshape fail or the round trip change a shape. That costs
microseconds per rule, so it always runs. What
no reshape notices (an embedding's row count, an expert's width) is caught by the Megatron layout check of the
converter (`checkpoint.layout`).

The error then names the tensor, the shape the config implies and the shape the file holds: for an HF checkpoint
from transformers' own model class built on the meta device (`describe_mismatch`; only on that error path, as it
costs the transformers import and seconds at 80B scale; for a Megatron checkpoint through the mapping from the HF
shapes of its config, `describe_mcore_mismatch`), otherwise from the failing rule's tensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from megatron_slim.errors import CheckpointError
from megatron_slim.models.config import ModelConfig
from megatron_slim.models.mapping import BoundRule
from megatron_slim.models.registry import hf_config_from
from megatron_slim.runtime.fla_package import enter_fla_without_its_init

Shapes = dict[str, tuple[int, ...]]  # tensor name -> shape


def expected_hf_shapes(hf_config: dict[str, Any]) -> Shapes:
    """{HF tensor name: shape} of the model `hf_config` describes (no memory: meta tensors, no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    enter_fla_without_its_init()  # transformers' Qwen3-Next imports fla's kernels from their submodules
    fields = {k: v for k, v in hf_config.items() if k not in ("model_type", "transformers_version")}
    config = AutoConfig.for_model(hf_config["model_type"], **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def describe_mismatch(hf_config: dict[str, Any], found: Shapes, limit: int = 3) -> str | None:
    """'<tensor>: the config implies (a, b), the checkpoint holds (c, d)' for the first mismatching tensors of
    `found` (name -> stored shape), or None when every tensor transformers knows has the shape the config implies
    (or transformers cannot build the model the config describes at all)."""
    try:
        want = expected_hf_shapes(hf_config)
    except (KeyError, TypeError, ValueError, RuntimeError):
        return None
    wrong = [f"{k}: the config implies {want[k]}, the checkpoint holds {tuple(s)}"
             for k, s in found.items() if k in want and want[k] != tuple(s)]
    return _listed(wrong, limit)


def describe_mcore_mismatch(cfg: ModelConfig, rules: list[BoundRule], stored: Shapes, limit: int = 3) -> str | None:
    """`describe_mismatch` for a Megatron checkpoint (`stored`: its tensors' shapes): the shapes transformers gives
    the HF config of `cfg`, taken through each rule's `to_mcore` (rules whose HF tensors transformers names)."""
    try:
        want_hf = expected_hf_shapes(hf_config_from(cfg))
    except (KeyError, TypeError, ValueError, RuntimeError):
        return None
    wrong = []
    for rule in rules:
        if not all(k in want_hf for k in rule.hf):
            continue
        try:
            want = rule.transform.mcore_specs([(want_hf[k], torch.float32) for k in rule.hf], cfg)
        except ValueError:
            continue
        wrong += [f"{k}: the config implies {shape}, the checkpoint holds {stored[k]}"
                  for k, (shape, _) in zip(rule.mcore, want) if k in stored and shape != stored[k]]
    return _listed(wrong, limit)


def _listed(wrong: list[str], limit: int) -> str | None:
    if not wrong:
        return None
    more = f" (and {len(wrong) - limit} more)" if len(wrong) > limit else ""
    return "config/weight shape mismatch: " + "; ".join(wrong[:limit]) + more


def check_mapping_shapes(path: Path, cfg: ModelConfig, rules: list[BoundRule], stored: Shapes, side: str,
                         explain: Callable[[], str | None] = lambda: None) -> None:
    """Raise a CheckpointError when `cfg` disagrees with the `stored` shapes of a checkpoint at `path`, whose
    tensors are the rules' `side` ("hf" or "mcore"); `explain()` may name the tensors and shapes better."""
    for rule in rules:
        names = rule.hf if side == "hf" else rule.mcore
        specs = [(tuple(stored[k]), torch.float32) for k in names]
        forth, back = ((rule.transform.mcore_specs, rule.transform.hf_specs) if side == "hf"
                       else (rule.transform.hf_specs, rule.transform.mcore_specs))
        try:
            returned = back(forth(specs, cfg), cfg)
            wrong = [f"{k}: the config implies {shape}, the checkpoint holds {stored[k]}"
                     for k, (shape, _) in zip(names, returned, strict=True) if shape != tuple(stored[k])]
            failure = "config/weight shape mismatch: " + "; ".join(wrong[:3]) if wrong else None
        except ValueError as e:
            held = ", ".join(f"{k} {stored[k]}" for k in names[:3])
            failure = (f"config/weight shape mismatch: the config cannot describe {held}"
                       f"{' ...' if len(names) > 3 else ''} ({rule.where}: {e})")
        if failure:
            raise CheckpointError(f"{path}: {explain() or failure}")
