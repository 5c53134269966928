"""The tensor shapes an HF config implies, from transformers' own model class built on the meta device.

Used to explain a config that disagrees with its weights (say `hidden_size` edited by hand): the mapping's reshapes
then fail with a bare `shape '[...]' is invalid`, and this names the tensor, the shape the config implies and the
shape the file holds. Only on that error path: building the meta model costs the transformers import.
"""
from __future__ import annotations

from typing import Any

import torch


def expected_hf_shapes(hf_config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """{HF tensor name: shape} of the model `hf_config` describes (no memory: meta tensors, no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in hf_config.items() if k not in ("model_type", "transformers_version")}
    config = AutoConfig.for_model(hf_config["model_type"], **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def describe_mismatch(hf_config: dict[str, Any], found: dict[str, tuple[int, ...]], limit: int = 3) -> str | None:
    """'<tensor>: the config implies (a, b), the checkpoint holds (c, d)' for the first mismatching tensors of
    `found` (name -> stored shape), or None when every tensor transformers knows has the shape the config implies."""
    want = expected_hf_shapes(hf_config)
    wrong = [f"{k}: the config implies {want[k]}, the checkpoint holds {tuple(s)}"
             for k, s in found.items() if k in want and want[k] != tuple(s)]
    if not wrong:
        return None
    more = f" (and {len(wrong) - limit} more)" if len(wrong) > limit else ""
    return "config/weight shape mismatch: " + "; ".join(wrong[:limit]) + more
