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


def decoder_fields(hf: dict[str, Any], family: str) -> dict[str, Any]:
    """The ModelConfig fields every supported family reads the same way from its HF config."""
    return dict(
        family=family,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        max_position_embeddings=hf["max_position_embeddings"],
        rope_theta=rope_theta(hf, family),
        norm_eps=hf["rms_norm_eps"],
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.0),
        initializer_range=hf.get("initializer_range", 0.02),
        hf_config=hf,
    )
