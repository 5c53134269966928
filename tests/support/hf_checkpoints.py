"""Tiny random HF checkpoints, in memory and on disk, laid out like hub ones (sharded, with Qwen3-Next's `mtp.*`
tensors), a reader of every tensor a checkpoint directory holds, and a byte-level tokenizer for tiny checkpoints
that need tokenizer files.

The configs come from `support.tiny_models`; `build_tiny_hf(cfg, seed).save_pretrained(dir)` is the plain checkpoint,
`save_tiny_hf_with_mtp` the hub-like Qwen3-Next one, `write_shard` adds tensors the way a hub index lists them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel


def build_tiny_hf(hf_config: dict[str, Any], seed: int) -> PreTrainedModel:
    """Random transformers model in eval mode, seeded without touching the global RNG."""
    cfg = AutoConfig.for_model(hf_config["model_type"], **{k: v for k, v in hf_config.items() if k != "model_type"})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg).eval()


def random_mtp_tensors(model: PreTrainedModel, saved: dict[str, torch.Size], seed: int,
                       mtp_layers: int) -> dict[str, torch.Tensor]:
    """Qwen3-Next MTP tensors in the on-disk layout; `mtp.layers.i.*` copy the key names and shapes of the first
    full-attention layer. Norm weights are random too, so dropping the zero-centring changes results."""
    cfg = model.config
    h, std = cfg.hidden_size, cfg.initializer_range
    full = f"model.layers.{cfg.layer_types.index('full_attention')}."
    shapes = {f"mtp.{n}.weight": torch.Size([h]) for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")}
    shapes["mtp.fc.weight"] = torch.Size([h, 2 * h])
    for i in range(mtp_layers):
        shapes |= {f"mtp.layers.{i}.{k[len(full):]}": shape for k, shape in saved.items() if k.startswith(full)}
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) * std for k, shape in sorted(shapes.items())}


def write_shard(out_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Add `tensors` as a new shard, renaming all shards to hub-style `model-0000i-of-0000n` names and
    rewriting model.safetensors.index.json."""
    index_path = out_dir / "model.safetensors.index.json"
    if index_path.exists():
        weight_map = json.loads(index_path.read_text())["weight_map"]
    else:
        with safe_open(out_dir / "model.safetensors", "pt") as f:
            weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    shards = sorted(set(weight_map.values()))
    total = len(shards) + 1
    renamed = {old: f"model-{i:05d}-of-{total:05d}.safetensors" for i, old in enumerate(shards, 1)}
    for old, new in renamed.items():
        (out_dir / old).rename(out_dir / new)
    new_shard = f"model-{total:05d}-of-{total:05d}.safetensors"
    save_file(tensors, out_dir / new_shard, metadata={"format": "pt"})
    weight_map = {k: renamed[v] for k, v in weight_map.items()} | dict.fromkeys(tensors, new_shard)
    total_size = 0
    for shard in set(weight_map.values()):
        with safe_open(out_dir / shard, "pt") as f:
            total_size += sum(f.get_tensor(k).nbytes for k in f.keys())
    index_path.write_text(json.dumps({"metadata": {"total_size": total_size},
                                      "weight_map": dict(sorted(weight_map.items()))}, indent=2))


def read_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in hf_dir, by name (what the checkpoint holds, shards merged)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            tensors |= {k: f.get_tensor(k) for k in f.keys()}
    return tensors


def saved_shapes(out_dir: Path) -> dict[str, torch.Size]:
    """Tensor names and shapes of a saved checkpoint, as they are on disk."""
    shapes: dict[str, torch.Size] = {}
    for path in sorted(out_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            shapes |= {k: torch.Size(f.get_slice(k).get_shape()) for k in f.keys()}
    return shapes


def save_tiny_hf_with_mtp(hf_config: dict[str, Any], out_dir: str | Path, seed: int,
                          mtp_layers: int = 1) -> PreTrainedModel:
    """Save a random model with save_pretrained (safetensors, several shards, generation_config.json) plus
    `mtp_layers` random Qwen3-Next MTP layers in an extra shard; return the in-memory model."""
    out_dir = Path(out_dir)
    model = build_tiny_hf(hf_config, seed)
    model.save_pretrained(out_dir, max_shard_size="500KB")
    if mtp_layers:
        write_shard(out_dir, random_mtp_tensors(model, saved_shapes(out_dir), seed + 1, mtp_layers))
    return model


def byte_tokenizer():
    """A 256-byte BPE tokenizer without merges (plus EOS), built in memory: the CLI needs tokenizer files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")
