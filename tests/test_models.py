"""Each family builds from an HF config, runs forward and backward, and learns; bad configs fail clearly."""
import pytest
import torch

from megatron_slim.models.builder import pipeline_pattern, validate_layout
from megatron_slim.models.config import UnsupportedModelError
from megatron_slim.models.registry import model_config_from_hf
from megatron_slim.runtime.layout import ParallelLayout
from support import tiny_models
from support.dist import run_distributed
from support.workers import batch_major_logits_check, train_steps


@pytest.mark.parametrize("family", sorted(tiny_models.FAMILIES))
def test_forward_backward_and_loss_decreases(family):
    tokens = torch.randint(0, tiny_models.VOCAB, (4, 17), generator=torch.Generator().manual_seed(0))
    (res,) = run_distributed(train_steps, 1, family, 8, tokens)
    losses = res["losses"]
    assert res["missing_grads"] == []
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses


def test_batch_major_logits_change_no_value():
    """The output layer writes logits in [b, s, v] order (no copy at the model's final transpose): logits and the
    labels path's loss are bit-identical to the layer without that layout; gradients equal up to the order in
    which the weight gradient sums over tokens (batch-major now)."""
    tokens = torch.randint(0, tiny_models.VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))
    (res,) = run_distributed(batch_major_logits_check, 1, "mixtral", tokens)
    hooked, plain = res["hooked"], res["plain"]
    assert hooked["contiguous"] and plain["contiguous"]
    assert torch.equal(hooked["logits"], plain["logits"]) and torch.equal(hooked["loss"], plain["loss"])
    assert hooked["grads"].keys() == plain["grads"].keys()
    for name, grad in plain["grads"].items():
        torch.testing.assert_close(hooked["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_hybrid_patterns():
    nxt = model_config_from_hf(tiny_models.qwen3_next(), mtp_num_layers=1)
    assert nxt.hybrid_pattern == "GEGEGE*E/*E"
    assert pipeline_pattern(nxt, 2) == "GEGE|GE*E/*E"
    moe = model_config_from_hf(tiny_models.qwen3_moe(mlp_only_layers=[0], decoder_sparse_step=1))
    assert moe.hybrid_pattern == "*-*E*E*E"
    assert model_config_from_hf(tiny_models.mixtral()).hybrid_pattern == "*E*E*E*E"


@pytest.mark.parametrize("hf, match", [
    ({"architectures": ["LlamaForCausalLM"]}, "unsupported architecture"),
    (tiny_models.qwen3_moe(rope_parameters={"rope_theta": 1e4, "rope_type": "yarn"}), "rope scaling 'yarn'"),
    (tiny_models.mixtral(sliding_window=4096), "sliding_window"),
    (tiny_models.qwen3_moe(attention_bias=True), "attention_bias"),
    (tiny_models.qwen3_next(layer_types=["linear_attention"] * 3 + ["sliding_attention"]), "layer_types"),
])
def test_unsupported_configs_are_named(hf, match):
    with pytest.raises(UnsupportedModelError, match=match):
        model_config_from_hf(hf)


def test_mtp_only_for_qwen3_next():
    with pytest.raises(UnsupportedModelError, match="MTP layers requested"):
        model_config_from_hf(tiny_models.mixtral(), mtp_num_layers=1)


def test_layout_errors_name_the_problem():
    cfg = model_config_from_hf(tiny_models.qwen3_next())
    with pytest.raises(ValueError, match="num_experts=8 is not divisible by ep=3"):
        validate_layout(cfg, ParallelLayout(ep=3))
    with pytest.raises(ValueError, match="linear_num_key_heads=2 is not divisible by tp\\*cp=4"):
        validate_layout(cfg, ParallelLayout(tp=4))
    with pytest.raises(ValueError, match="num_layers=4 is not divisible by pp=3"):
        validate_layout(cfg, ParallelLayout(pp=3))
    with pytest.raises(ValueError, match="not divisible by tp\\*pp\\*cp"):
        ParallelLayout(tp=2, pp=2).validate_world(6)
    with pytest.raises(ValueError, match="ep\\*expert_tp\\*pp"):
        ParallelLayout(ep=4).validate_world(2)
