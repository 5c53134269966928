"""A fingerprint of a model: which weights an importance file, and the plan made from it, were computed on.

`prune` applies a plan by indices into its source model; applied to another model of the same shapes (the base
instead of the instruct model, another seed, another fine-tune) it runs without error and writes a student whose
kept experts, neurons and heads were chosen for someone else. Comparing configs cannot notice that, so the
fingerprint also covers weights, chosen to be cheap at 80B scale and to change whenever training changed the model:

- the model config's fields (everything that sets a shape or the forward's arithmetic; not the raw HF config,
  whose bookkeeping fields differ between formats);
- the values of every 1-D tensor (the norm gains of every layer, GDN's A_log and dt_bias): every full fine-tune
  and every training run moves them, and they are ~0.01% of the weights (under 1 MB at 80B);
- the values of every tensor of the first decoder layer except its routed experts (attention or GDN projections,
  router, shared expert): adapter fine-tunes (LoRA, merged) leave norms alone but change the projections of every
  layer, so the first one suffices (tens of MB at 80B; the routed experts, GBs per layer, are left out).

Tensors are read as HF-layout tensors (`checkpoint.source`), hashed as float32 (exact for bf16/fp16/fp32), so an
HF checkpoint and its Megatron conversion have the same fingerprint: importance may run on either and prune on
either. It reads a few hundred small tensors and no routed expert: well under a second from the page cache.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from megatron_slim.checkpoint.source import Source

VERSION = "v1"


def model_fingerprint(path: str | Path) -> str:
    """`v1:<hex>` for the checkpoint at `path` (HF or Megatron); see the module docstring for what it covers."""
    source = Source(Path(path))
    digest = hashlib.sha256()
    fields = {k: v for k, v in source.cfg.to_json().items() if k != "hf_config"}
    digest.update(json.dumps(fields, sort_keys=True).encode())
    for where, rules in source.groups.items():
        for rule in rules:
            if rule.per_expert:
                continue
            shapes = source.read_rule(rule, meta=True)
            if where != "layer 0" and any(t.dim() != 1 for t in shapes.values()):
                continue
            for name, t in source.read_rule(rule).items():
                digest.update(f"{name}{tuple(t.shape)}".encode())
                digest.update(t.float().contiguous().numpy().tobytes())
    return f"{VERSION}:{digest.hexdigest()[:32]}"
