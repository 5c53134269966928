"""Strict reading of HF config fields: every field that changes the math is either modelled or rejected."""
from __future__ import annotations

from typing import Any

from megatron_slim.models.config import UnsupportedModelError


def require_values(hf: dict[str, Any], allowed: dict[str, tuple[Any, ...]], family: str) -> None:
    """Raise for any present field whose value we do not implement (e.g. biases, sliding windows, rope scaling)."""
    bad = {k: hf[k] for k, ok in allowed.items() if k in hf and hf[k] not in ok}
    if bad:
        raise UnsupportedModelError(f"{family}: unsupported config values {bad} (supported: "
                                    + ", ".join(f"{k} in {allowed[k]}" for k in bad) + ")")


def rope_theta(hf: dict[str, Any], family: str) -> float:
    """rope_theta from the top level or transformers 5's `rope_parameters`; scaled RoPE variants are rejected."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for p in (params, scaling):
        kind = p.get("rope_type", p.get("type", "default"))
        if kind not in ("default", None):
            raise UnsupportedModelError(f"{family}: rope scaling {kind!r} is not supported")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise UnsupportedModelError(f"{family}: config has no rope_theta")
    return float(theta)


def partial_rotary(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or {}
    return float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
