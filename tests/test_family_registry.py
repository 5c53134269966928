"""A model family is one folder plus one registration (`models/registry.py:register`). A family registered under a
new HF architecture, made of Qwen3-MoE's pieces, is parsed, converted both ways and pruned through its registration
alone; before it is registered, its checkpoints are refused."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from megatron_slim.checkpoint.convert import hf_to_mcore, mcore_to_hf
from megatron_slim.checkpoint.files import Checkpoint
from megatron_slim.checkpoint.mcore import load_model_config
from megatron_slim.checkpoint.source import plan_hf_to_mcore
from megatron_slim.compress.plan import CompressionPlan
from megatron_slim.compress.plan_check import implied_target
from megatron_slim.compress.prune_checkpoint import prune_checkpoint
from megatron_slim.models import qwen3_moe, registry
from megatron_slim.models.config import UnsupportedModelError, load_hf_config
from megatron_slim.models.family import Family
from support import tiny_models
from support.hf_checkpoints import build_tiny_hf, read_tensors

NAME, ARCH = "toy_moe", "ToyMoeForCausalLM"


def toy_family() -> Family:
    """Qwen3-MoE's config reader/writer, mapping and surgery table under another name and architecture (its
    configs keep Qwen3-MoE's `model_type`, which the family declares)."""
    base = qwen3_moe.FAMILY
    return dataclasses.replace(base, name=NAME, architecture=ARCH, model_type=base.hf_model_type,
                               from_hf=lambda hf: base.from_hf(hf).replace(family=NAME),
                               to_hf=lambda cfg: base.to_hf(cfg) | {"architectures": [ARCH]})


@pytest.fixture(scope="module")
def toy_hf(tmp_path_factory) -> Path:
    """A tiny random Qwen3-MoE checkpoint whose config names the toy architecture."""
    out = tmp_path_factory.mktemp("toy") / "hf"
    build_tiny_hf(tiny_models.qwen3_moe(), seed=0).save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {"architectures": [ARCH]}))
    return out


@pytest.fixture
def registered():
    registry.register(toy_family())
    yield
    registry.FAMILIES.pop(NAME)


def test_an_unregistered_architecture_is_refused(toy_hf):
    for read in (registry.model_config_from_hf, plan_hf_to_mcore):
        with pytest.raises(UnsupportedModelError, match=f"unsupported architecture \\['{ARCH}'\\]"):
            read(toy_hf)
    with pytest.raises(ValueError, match="clashes"):
        registry.register(qwen3_moe.FAMILY)  # a family registers once


def test_a_registered_family_parses_converts_and_prunes(toy_hf, tmp_path, registered):
    cfg = registry.model_config_from_hf(toy_hf)
    assert cfg.family == NAME and cfg.replace(family="qwen3_moe") == qwen3_moe.FAMILY.from_hf(load_hf_config(toy_hf))

    mcore, back = tmp_path / "mcore", tmp_path / "back"
    hf_to_mcore(toy_hf, mcore, progress=False)
    assert Checkpoint.open(mcore).kind == "mcore" and load_model_config(mcore).family == NAME
    mcore_to_hf(mcore, back, progress=False)
    assert json.loads((back / "config.json").read_text())["architectures"] == [ARCH]
    source = read_tensors(toy_hf)
    returned = read_tensors(back)
    assert returned.keys() == source.keys() and all(torch.equal(t, source[k]) for k, t in returned.items())

    src = plan_hf_to_mcore(toy_hf)[0]
    kept = [0, 2, 5, 7]
    plan = CompressionPlan(source=src, target=src, layers=[0, 2, 3],
                           experts={f"layers.{i}": [[(e, 1.0)] for e in kept] for i in (0, 2, 3)})
    problems: list[str] = []
    plan.target = implied_target(plan, problems)
    assert not problems, problems
    prune_checkpoint(plan, mcore, tmp_path / "pruned_hf", "hf", progress=False)  # Megatron in, HF out
    pruned = registry.model_config_from_hf(tmp_path / "pruned_hf")
    assert (pruned.family, pruned.num_layers, pruned.num_experts) == (NAME, 3, len(kept))
    down = "model.layers.{}.mlp.experts.{}.down_proj.weight"
    assert torch.equal(read_tensors(tmp_path / "pruned_hf")[down.format(1, 2)], source[down.format(2, 5)])
    prune_checkpoint(plan, toy_hf, tmp_path / "pruned_mcore", "mcore", progress=False)  # HF in, Megatron out
    assert load_model_config(tmp_path / "pruned_mcore") == plan.target
