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
  layer, so the first one suffices (tens of MB at 80B; the routed experts, GBs per layer, are left out);
- the values of every tensor outside the decoder layers (embeddings, final norm, output layer: about 1.2 GB at 80B,
  hashed a block of rows at a time): a vocabulary extension or an embedding swapped in from another checkpoint
  (v1 left them out, so a checkpoint whose embedding was another model's still matched).

Tensors are read as HF-layout tensors (`checkpoint.source`), hashed as float32 (exact for bf16/fp16/fp32), so an
HF checkpoint and its Megatron conversion have the same fingerprint: importance may run on either and prune on
either. It reads a few hundred small tensors, the embeddings and head, and no routed expert: about a second from
the page cache at 80B.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from megatron_slim.checkpoint.source import Source

VERSION = "v2"
_ROWS = 4096  # rows of a 2-D tensor converted to float32 and hashed at once (bounds the copy)


VERSIONS = ("v1", VERSION)


def model_fingerprint(path: str | Path, version: str = VERSION) -> str:
    """`v2:<hex>` for the checkpoint at `path` (HF or Megatron); see the module docstring for what it covers.
    `version="v1"` computes the older fingerprint (no tensors outside the layers) to check plans written then."""
    if version not in VERSIONS:
        raise ValueError(f"unknown fingerprint version {version!r} (known: {', '.join(VERSIONS)})")
    source = Source(Path(path))
    digest = hashlib.sha256()
    fields = {k: v for k, v in source.cfg.to_json().items() if k != "hf_config"}
    digest.update(json.dumps(fields, sort_keys=True).encode())
    for where, rules in source.groups.items():
        for rule in rules:
            if rule.per_expert:
                continue
            shapes = source.read_rule(rule, meta=True)
            in_layers = where.startswith(("layer ", "mtp ")) or version == "v1"
            if in_layers and where != "layer 0" and any(t.dim() != 1 for t in shapes.values()):
                continue
            for name, t in source.read_rule(rule).items():
                digest.update(f"{name}{tuple(t.shape)}".encode())
                for start in range(0, max(1, t.shape[0] if t.dim() else 1), _ROWS):
                    block = t[start:start + _ROWS] if t.dim() else t
                    digest.update(block.float().contiguous().numpy().tobytes())
    return f"{version}:{digest.hexdigest()[:32]}"
