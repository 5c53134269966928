"""The importance file: calibration statistics of one model, as named float32 tensors plus a JSON header.

Written by `megatron-slim importance`, read by `megatron-slim plan`. One safetensors file; its `__metadata__`
holds `header` (JSON: model config, data source, token count, options, and the fingerprint of the model's weights
that a plan carries to `prune`, see `checkpoint/fingerprint.py`). Tensor names, per decoder layer `i`
(`layers.{i}.`) and per MTP depth `d` (`mtp.{d}.`, statistics of the MTP layer's own MoE/attention):

  experts.frequency      [E]    share of tokens routed to each expert (count / tokens; sums to topk)
  experts.soft_logits    [E]    mean router probability mass per expert (softmax over all experts; sums to 1)
  experts.reap           [E]    REAP: mean over the tokens routed to e of gate(e) * ||expert_e(x)||_2
                                (0 if never routed)
  experts.coactivation   [E,E]  share of tokens routed to both i and j (diagonal = frequency)
  experts.router_cosine  [E,E]  cosine similarity of router rows (merge partners)
  experts.neurons        [E,F]  mean |silu(gate) * up| of each expert neuron over the tokens routed to the expert
  shared_expert.neurons  [Fs]   same for the shared expert, over all tokens
  dense_mlp.neurons      [F]    same for dense MLP layers
  attention.heads        [Hq]   mean L2 norm of each query head's attention output (before o_proj), full attention
  attention.query_groups [G]    sum of `attention.heads` over the heads of each query group
  gdn.heads              [Hv]   mean L2 norm of each Gated DeltaNet value head's (gated, normed) output
  block_influence        [1]    1 - mean cosine(layer input, layer output) of the whole decoder layer
  loss_increase          [1]    LM-loss increase when the layer is skipped (only with --layer-loss)
and model-wide:
  hidden.channels        [H]    mean |x| of each hidden channel at the outputs of every norm feeding the residual
                                stream's readers (input and pre-MLP norms, final norm), Minitron-style
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_slim.models.config import ModelConfig

FORMAT_VERSION = 1


def layer_prefix(layer: int | None = None, mtp_depth: int | None = None) -> str:
    return f"mtp.{mtp_depth}." if mtp_depth is not None else f"layers.{layer}."


@dataclass
class Importance:
    model: ModelConfig
    tensors: dict[str, torch.Tensor]
    tokens: int
    data: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    fingerprint: str | None = None  # of the model's weights (`checkpoint.fingerprint`); None in older files

    def get(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise KeyError(f"importance file has no {name!r} (was it collected with the needed options?)")
        return self.tensors[name]

    def save(self, path: str | Path) -> None:
        header = {"format_version": FORMAT_VERSION, "model_config": self.model.to_json(), "tokens": self.tokens,
                  "data": self.data, "options": self.options, "fingerprint": self.fingerprint}
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.tensors.items()}
        save_file(tensors, str(path), metadata={"header": json.dumps(header)})

    @classmethod
    def load(cls, path: str | Path) -> "Importance":
        with safe_open(str(path), "pt") as f:
            header = json.loads((f.metadata() or {}).get("header", "{}"))
            if header.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{path}: not a megatron-slim importance file (format {header.get('format_version')})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return cls(ModelConfig.from_json(header["model_config"]), tensors, header["tokens"], header.get("data", ""),
                   header.get("options", {}), header.get("fingerprint"))
