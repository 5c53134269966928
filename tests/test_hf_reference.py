"""The transformers reference runs on CPU with fla installed, the sharded MTP fixture loads like a hub
checkpoint, and the float64 MTP head matches hand-computed and transformers-computed values."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoConfig

from megatron_slim.verify.hf_reference import (
    load_hf_reference,
    mtp_reference_logits,
    reference_hidden,
    reference_logits,
    select_torch_kernels,
)
from support import tiny_models
from support.hf_checkpoints import read_tensors, save_tiny_hf_with_mtp, write_shard

EPS = tiny_models.qwen3_next()["rms_norm_eps"]


@pytest.fixture(scope="module")
def qwen3_next_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qwen3_next")
    save_tiny_hf_with_mtp(tiny_models.qwen3_next(), out, seed=0)
    return out


def _tokens(batch: int = 2, seq: int = 10, seed: int = 1) -> torch.LongTensor:
    return torch.randint(0, tiny_models.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _zc_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x / (x.pow(2).mean(-1, keepdim=True) + EPS).sqrt() * (1 + w)


def test_qwen3_next_runs_on_torch_kernels_fp32_matches_fp64(qwen3_next_dir: Path) -> None:
    assert importlib.util.find_spec("fla") is not None, "this test is about transformers picking fla's kernels"
    from transformers.models.qwen3_next import modeling_qwen3_next as hf_module
    before = hf_module.torch_chunk_gated_delta_rule
    tokens = _tokens()
    logits32 = reference_logits(load_hf_reference(qwen3_next_dir), tokens)
    model64 = load_hf_reference(qwen3_next_dir, torch.float64)
    logits64 = reference_logits(model64, tokens)
    assert logits32.dtype == torch.float32 and logits64.dtype == torch.float64
    assert logits32.shape == (2, 10, tiny_models.VOCAB)
    assert (logits32.double() - logits64).abs().max() < 1e-4
    assert logits64.std() > 0.1  # not a degenerate model
    hidden = reference_hidden(model64, tokens)
    assert torch.allclose(F.linear(hidden, model64.lm_head.weight), logits64, atol=1e-10)
    assert hf_module.torch_chunk_gated_delta_rule is before  # per instance: nothing global was patched


def test_sharded_checkpoint_loads_without_mtp_and_matches_in_memory_model(tmp_path: Path) -> None:
    model = save_tiny_hf_with_mtp(tiny_models.qwen3_next(), tmp_path, seed=3)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((tmp_path / s).exists() for s in shards)
    assert any(k.startswith("mtp.layers.0.mlp.experts.") for k in index["weight_map"])
    assert (tmp_path / "generation_config.json").exists()
    loaded = load_hf_reference(tmp_path)
    assert not any(k.startswith("mtp") for k in loaded.state_dict())
    model.set_attn_implementation("eager")
    model.set_experts_implementation("eager")
    tokens = _tokens(seed=4)
    assert torch.equal(reference_logits(loaded, tokens), reference_logits(select_torch_kernels(model), tokens))


def test_mtp_with_identity_layer_matches_hand_computation(qwen3_next_dir: Path, tmp_path: Path) -> None:
    """Zero o_proj and expert/shared-expert down projections make the MTP decoder layer the identity, leaving
    logits = lm_head(zc_norm(fc_e @ zc_norm_e(embed(token[t+1])) + fc_h @ zc_norm_h(h[t]))). fc_e and fc_h
    differ and the norm weights are random, so a swapped concat, a wrong shift or a plain (1 * w) norm shows."""
    for path in qwen3_next_dir.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    t = read_tensors(tmp_path)
    mtp = {k: v for k, v in t.items() if k.startswith("mtp.")}
    for k in mtp:
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            mtp[k] = torch.zeros_like(mtp[k])
    shard = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]["mtp.fc.weight"]
    save_file(mtp, tmp_path / shard, metadata={"format": "pt"})

    tokens, h = _tokens(seed=5), torch.randn(2, 10, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    t = {k: v.double() for k, v in t.items()}
    fc_e, fc_h = t["mtp.fc.weight"].chunk(2, dim=1)

    def step(h_prev: torch.Tensor, next_tokens: torch.LongTensor) -> torch.Tensor:
        e = t["model.embed_tokens.weight"][next_tokens]
        x = _zc_norm(e, t["mtp.pre_fc_norm_embedding.weight"]) @ fc_e.T
        x = x + _zc_norm(h_prev, t["mtp.pre_fc_norm_hidden.weight"]) @ fc_h.T
        return _zc_norm(x, t["mtp.norm.weight"])

    h1 = step(h[:, :-1], tokens[:, 1:])
    h2 = step(h1[:, :-1], tokens[:, 2:])
    for depth, expect in ((1, h1), (2, h2)):
        got = mtp_reference_logits(tmp_path, tokens, h, depth=depth)
        assert got.dtype == torch.float64 and got.shape == (2, 10 - depth, tiny_models.VOCAB)
        assert torch.allclose(got, expect @ t["lm_head.weight"].T, atol=1e-10, rtol=0)


def test_mtp_layer_matches_transformers_decoder_layer(qwen3_next_dir: Path, tmp_path: Path) -> None:
    """The MTP layer's attention and MoE agree with transformers': a 1-layer Qwen3-Next built from the mtp.*
    tensors (transformers converts their per-expert layout itself) and fed the fc output as inputs_embeds."""
    t = read_tensors(qwen3_next_dir)
    one_layer = {"model.embed_tokens.weight": t["model.embed_tokens.weight"], "lm_head.weight": t["lm_head.weight"],
                 "model.norm.weight": t["mtp.norm.weight"]}
    mtp_layer = "mtp.layers.0."
    one_layer |= {"model.layers.0." + k.removeprefix(mtp_layer): v for k, v in t.items() if k.startswith(mtp_layer)}
    d = tiny_models.qwen3_next(num_hidden_layers=1, layer_types=["full_attention"])
    AutoConfig.for_model(d.pop("model_type"), **d).save_pretrained(tmp_path)
    save_file(one_layer, tmp_path / "model.safetensors", metadata={"format": "pt"})
    hf_layer = load_hf_reference(tmp_path, torch.float64)

    tokens = _tokens(seed=7)
    hidden = reference_hidden(load_hf_reference(qwen3_next_dir, torch.float64), tokens)
    t = {k: v.double() for k, v in t.items()}
    fc_in = torch.cat([_zc_norm(t["model.embed_tokens.weight"][tokens[:, 1:]], t["mtp.pre_fc_norm_embedding.weight"]),
                       _zc_norm(hidden[:, :-1], t["mtp.pre_fc_norm_hidden.weight"])], dim=-1)
    with torch.no_grad():
        expect = hf_layer(inputs_embeds=fc_in @ t["mtp.fc.weight"].T, use_cache=False).logits
    got = mtp_reference_logits(qwen3_next_dir, tokens, hidden)
    assert expect.std() > 0.1
    assert torch.allclose(got, expect, atol=1e-5, rtol=0)  # transformers keeps its norms and softmax in fp32


def test_write_shard_turns_single_file_into_indexed_shards(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "model.safetensors")
    write_shard(tmp_path, {"b": torch.zeros(3)})
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index == {"metadata": {"total_size": 20}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                                                    "b": "model-00002-of-00002.safetensors"}}
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == sorted(set(index["weight_map"].values()))
