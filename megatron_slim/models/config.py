"""One explicit, family-agnostic description of a supported MoE model, parsed from a Hugging Face config.json.

Everything downstream (Megatron model building, conversion, importance, pruning, accounting) reads this
dataclass, not the HF dict. The per-family parsers live in `models/<family>/config.py`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_slim.errors import CheckpointError, UserError

if TYPE_CHECKING:
    from megatron_slim.runtime.layout import ParallelLayout

# Hybrid layer symbols (megatron-core's HybridModel pattern language).
GDN, ATTENTION, MOE, DENSE_MLP = "G", "*", "E", "-"


class UnsupportedModelError(UserError, ValueError):
    """The checkpoint's architecture or a math-changing config field is not supported."""


@dataclass
class ModelConfig:
    family: str  # a registered family's name (models/registry.py): "qwen3_moe", "qwen3_next", "mixtral"
    vocab_size: int
    hidden_size: int
    num_layers: int  # HF decoder layers; each is one mixer + one MLP in the hybrid pattern
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float
    norm_eps: float
    tie_word_embeddings: bool
    num_experts: int
    topk: int
    moe_ffn_hidden_size: int
    norm_topk_prob: bool
    mixer_types: list[str]  # per layer: GDN or ATTENTION
    mlp_types: list[str]  # per layer: MOE or DENSE_MLP
    dense_ffn_hidden_size: int = 0  # width of DENSE_MLP layers
    rotary_percent: float = 1.0
    qk_layernorm: bool = False
    attention_output_gate: bool = False  # Qwen3-Next: sigmoid(gate) * attention output, gate from q_proj
    zero_centered_norm: bool = False  # Qwen3-Next: x_hat * (1 + w)
    shared_expert_ffn_hidden_size: int = 0
    shared_expert_gate: bool = False
    router_aux_loss_coef: float = 0.0
    initializer_range: float = 0.02
    # Gated DeltaNet (Qwen3-Next linear attention)
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0
    # Multi-token prediction depths (detected from checkpoint keys for Qwen3-Next: HF configs do not declare it).
    mtp_num_layers: int = 0
    # The source HF config, kept so that export writes back every field we do not model.
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.mixer_types) != self.num_layers or len(self.mlp_types) != self.num_layers:
            raise ValueError("mixer_types and mlp_types need one entry per layer")
        if set(self.mixer_types) - {GDN, ATTENTION} or set(self.mlp_types) - {MOE, DENSE_MLP}:
            raise ValueError(f"bad layer types {self.mixer_types} / {self.mlp_types}")
        if self.topk > self.num_experts:
            raise ValueError(f"topk {self.topk} > num_experts {self.num_experts}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def mtp_layer_pattern(self) -> str:
        """Each MTP depth is one full-attention layer with the same MLP kind as the decoder's MoE layers."""
        return ATTENTION + MOE

    @property
    def hybrid_pattern(self) -> str:
        """megatron-core HybridModel pattern: per HF layer its mixer then its MLP, then '/'-separated MTP depths."""
        main = "".join(m + f for m, f in zip(self.mixer_types, self.mlp_types))
        return main + ("/" + self.mtp_layer_pattern) * self.mtp_num_layers

    @property
    def has_gdn(self) -> bool:
        return GDN in self.mixer_types

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "model config") -> "ModelConfig":
        """The config as `to_json` wrote it; anything else (a field unknown to this version, one missing) is an
        error naming `where`, not a TypeError."""
        if not isinstance(d, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        unknown, missing = sorted(set(d) - names), sorted(required - set(d))
        if unknown or missing:
            parts = [f"unknown fields {unknown}"] if unknown else []
            parts += [f"missing fields {missing}"] if missing else []
            raise UserError(f"{where}: " + "; ".join(parts))
        return cls(**d)


def read_json_object(p: Path) -> dict[str, Any]:
    """A config file's JSON object; broken JSON or another kind of value is an error naming the file."""
    try:
        data = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{p}: not a JSON object")
    return data


def load_hf_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"no config.json at {p}")
    return read_json_object(p)


def validate_layout(cfg: ModelConfig, parallel: ParallelLayout) -> None:
    """Clear errors when the parallel sizes do not divide the model (megatron-core would assert deep inside); here,
    not in models/builder.py, so that checks before any model is built (a recipe's dry run) need no megatron-core."""
    problems = []
    tp = parallel.tp
    for name, value in [("num_attention_heads", cfg.num_attention_heads),
                        ("moe_ffn_hidden_size", cfg.moe_ffn_hidden_size)]:
        if value % tp:
            problems.append(f"{name}={value} is not divisible by tp={tp}")
    if cfg.num_query_groups % tp and tp % cfg.num_query_groups:
        problems.append(f"num_query_groups={cfg.num_query_groups} must divide or be a multiple of tp={tp}")
    if cfg.num_experts % parallel.ep:
        problems.append(f"num_experts={cfg.num_experts} is not divisible by ep={parallel.ep}")
    if cfg.has_gdn:
        for name in ("linear_num_key_heads", "linear_num_value_heads"):
            if getattr(cfg, name) % (tp * parallel.cp):
                problems.append(f"{name}={getattr(cfg, name)} is not divisible by tp*cp={tp * parallel.cp}")
    if cfg.shared_expert_ffn_hidden_size % tp:
        problems.append(f"shared_expert_ffn_hidden_size={cfg.shared_expert_ffn_hidden_size} not divisible by tp={tp}")
    if cfg.num_layers % parallel.pp:
        problems.append(f"num_layers={cfg.num_layers} is not divisible by pp={parallel.pp}")
    if problems:
        raise ValueError("parallel layout does not fit the model: " + "; ".join(problems))
