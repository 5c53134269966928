"""Checkpoints move between kernel backends (`checkpoint/load_rules.py`): a CPU-converted checkpoint loads into
a model whose modules carry Transformer Engine-style extra state, and a checkpoint written by such a model loads
into the local backend, with every tensor strict. The TE-style model is the local backend with real extra state
(`extra_state_backend.py`), TE's own modules need CUDA (`tests/gpu/`)."""
from __future__ import annotations

import pytest
import torch
from extra_state_backend import portability

from support import tiny_models
from support.dist import run_distributed
from support.hf_checkpoints import build_tiny_hf
from support.train_assets import convert


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("portable")
    converted = convert(build_tiny_hf(tiny_models.qwen3_next(), seed=3), root, "qwen3_next")
    tokens = torch.randint(0, tiny_models.VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    (out,) = run_distributed(portability, 1, str(converted), str(root), tokens, timeout_s=600)
    return out


def test_cpu_checkpoint_loads_into_te_style_modules_with_fresh_extra_state(result):
    assert result["cpu_to_te_fresh"]
    assert result["cpu_to_te_same_tensors"]
    torch.testing.assert_close(result["logits_te"], result["logits_local"], rtol=0, atol=0)


def test_te_style_checkpoint_differs_by_extra_state_only_and_loads_into_the_local_backend(result):
    te, local = set(result["te_objects"]), set(result["local_objects"])
    # the extra state only TE-style modules have (q/k norms) is in the TE-written checkpoint alone; linears (experts
    # included) store theirs under the same keys in both; the core attention's reaches no checkpoint
    only_te = te - local
    assert only_te and all(k.endswith(("q_layernorm._extra_state", "k_layernorm._extra_state")) for k in only_te)
    assert not any("core_attention" in k for k in te)
    assert local <= te and any(".mlp.experts.experts.linear_fc1._extra_state" in k for k in local)
    assert all(k.rsplit(".", 1)[-1] == "_extra_state" for k in te)
    assert result["te_to_local_same_tensors"]
    torch.testing.assert_close(result["logits_back_local"], result["logits_local"], rtol=0, atol=0)


def test_te_style_extra_state_round_trips(result):
    histories = result["histories"]
    # the forward recorded real state in every module (an expert that got no tokens records amax 0)
    assert histories and all(steps > 0 for steps, _ in histories.values())
    assert all(h[0] > 0 for name, (_, h) in histories.items() if "experts.local_experts" not in name)
    restored = result["restored_histories"]
    attention = {name for name in histories if name.endswith("core_attention")}
    assert attention and all(restored[name] == (0, [0.0] * 4) for name in attention)  # never saved: fresh
    assert {k: v for k, v in restored.items() if k not in attention} == \
        {k: v for k, v in histories.items() if k not in attention}


def test_a_missing_tensor_is_refused_even_across_backends(result):
    err = result["headless_error"]
    assert "does not hold" in err and "output_layer.weight" in err and "final_norm" in err, err
