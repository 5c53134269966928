"""compress/criteria.py: Spearman correlation against its closed form, ties, and the agreement of expert criteria on
an importance file (a constant criterion, as routing frequency is with every expert active, ranks nothing)."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_slim.compress.criteria import criteria_agreement, spearman
from megatron_slim.compress.importance_file import Importance, layer_prefix
from megatron_slim.models.config import ModelConfig


def test_spearman_matches_the_closed_form_without_ties() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        a, b = torch.randn(12, generator=g), torch.randn(12, generator=g)
        d = (a.argsort().argsort() - b.argsort().argsort()).double()
        n = len(a)
        assert spearman(a, b) == pytest.approx(1 - 6 * float((d * d).sum()) / (n * (n * n - 1)), abs=1e-12)
    assert spearman(torch.arange(5.0), torch.arange(5.0) * 3) == pytest.approx(1.0)
    assert spearman(torch.arange(5.0), -torch.arange(5.0)) == pytest.approx(-1.0)


def test_spearman_ties_take_mean_ranks_and_constants_are_nan() -> None:
    # ranks of [1, 2, 2, 3] are [0, 1.5, 1.5, 3]: Pearson of the rank vectors
    a, b = torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([4.0, 3.0, 2.0, 1.0])
    ra, rb = torch.tensor([0, 1.5, 1.5, 3], dtype=torch.float64), torch.tensor([3, 2, 1, 0], dtype=torch.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    assert spearman(a, b) == pytest.approx(float(ra @ rb / (ra.norm() * rb.norm())))
    assert math.isnan(spearman(torch.ones(4), b))


def test_criteria_agreement_counts_layers(tiny_config: ModelConfig) -> None:
    e = tiny_config.num_experts
    tensors = {}
    for i in range(tiny_config.num_layers):
        p = layer_prefix(i)
        tensors[f"{p}experts.frequency"] = torch.full((e,), 2.0 / e)  # every expert equally often
        tensors[f"{p}experts.soft_logits"] = torch.arange(e, dtype=torch.float32)
        tensors[f"{p}experts.reap"] = torch.arange(e, dtype=torch.float32).flip(0) if i % 2 else \
            torch.arange(e, dtype=torch.float32)
    found = {(a.first, a.second): a for a in criteria_agreement(Importance(tiny_config, tensors, 0), keep=2)}
    layers = tiny_config.num_layers
    freq = found[("frequency", "soft_logits")]
    assert freq.constant_layers == layers and math.isnan(freq.spearman)
    soft_reap = found[("soft_logits", "reap")]
    assert soft_reap.layers == layers and soft_reap.layers_differing == layers // 2
    assert soft_reap.spearman == pytest.approx(((layers + 1) // 2 - layers // 2) / layers)


@pytest.fixture
def tiny_config() -> ModelConfig:
    from megatron_slim.models.registry import model_config_from_hf
    from support.tiny_models import qwen3_moe

    return model_config_from_hf(qwen3_moe(num_hidden_layers=5))
