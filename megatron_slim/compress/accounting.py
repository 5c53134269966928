"""Parameter accounting from a ModelConfig alone (pure arithmetic), so a student can be sized before calibration.

Counts equal the parameters of the transformers model (plus Qwen3-Next's `mtp.*` tensors, which transformers
drops) and of the Megatron-Core HybridModel built from the same config; tests/test_plan.py checks both.

`active` is what one token's forward reads: one embedding row, the whole output head, every non-expert weight,
the router, and `topk` routed experts per MoE layer. MTP depths only run for multi-token prediction (training,
speculative decoding), so their row shows their own per-token count but the model's `active` total excludes them.
Model names such as "A3B" quote `active_non_embedding` (embedding row and output head left out), rounded.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_slim.models.config import ATTENTION, DENSE_MLP, GDN, MOE, ModelConfig

COMPONENTS = ("embeddings", "output_head", "attention", "gdn", "router", "routed_experts", "shared_experts",
              "dense_mlp", "norms", "mtp")


@dataclass(frozen=True)
class Count:
    total: int
    active: int

    def __add__(self, other: "Count") -> "Count":
        return Count(self.total + other.total, self.active + other.active)

    def times(self, n: int) -> "Count":
        return Count(self.total * n, self.active * n)


@dataclass(frozen=True)
class Accounting:
    components: dict[str, Count]  # keyed by COMPONENTS, in that order

    @property
    def total(self) -> int:
        return sum(c.total for c in self.components.values())

    @property
    def active(self) -> int:
        """Per token, main model only (the MTP row is excluded: see the module docstring)."""
        return sum(c.active for name, c in self.components.items() if name != "mtp")

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.components["embeddings"].active - self.components["output_head"].active

    def checkpoint_bytes(self, bytes_per_param: int) -> int:
        return self.total * bytes_per_param

    def to_json(self) -> dict:
        return {"components": {k: {"total": c.total, "active": c.active} for k, c in self.components.items()},
                "total": self.total, "active": self.active, "active_non_embedding": self.active_non_embedding,
                "checkpoint_bytes": {"bf16": self.checkpoint_bytes(2), "fp32": self.checkpoint_bytes(4)}}


def attention_weights(cfg: ModelConfig) -> int:
    """q (doubled by Qwen3-Next's output gate), k, v and o projections of one full-attention layer."""
    h, d = cfg.hidden_size, cfg.head_dim
    q = cfg.num_attention_heads * d * (2 if cfg.attention_output_gate else 1)
    return h * (q + 2 * cfg.num_query_groups * d) + cfg.num_attention_heads * d * h


def gdn_weights(cfg: ModelConfig) -> int:
    """Gated DeltaNet: in_proj (q, k, v, z, beta, alpha), depthwise conv over q/k/v, dt_bias, A_log, out_proj."""
    h, hv = cfg.hidden_size, cfg.linear_num_value_heads
    key_dim = cfg.linear_num_key_heads * cfg.linear_key_head_dim
    value_dim = hv * cfg.linear_value_head_dim
    in_proj = h * (2 * key_dim + 2 * value_dim + 2 * hv)
    conv = (2 * key_dim + value_dim) * cfg.linear_conv_kernel_dim
    return in_proj + conv + 2 * hv + value_dim * h


def mixer_norms(cfg: ModelConfig, mixer: str) -> int:
    """Norms inside a mixer: q/k RMSNorms (per head dim) or the GDN output norm (per value head dim)."""
    if mixer == GDN:
        return cfg.linear_value_head_dim
    return 2 * cfg.head_dim if cfg.qk_layernorm else 0


def swiglu(hidden: int, ffn: int) -> int:
    return 3 * hidden * ffn


def moe_counts(cfg: ModelConfig) -> dict[str, Count]:
    """One MoE block: router, routed experts (topk active) and the shared expert with its sigmoid gate."""
    h = cfg.hidden_size
    expert = swiglu(h, cfg.moe_ffn_hidden_size)
    shared = swiglu(h, cfg.shared_expert_ffn_hidden_size) + (h if cfg.shared_expert_gate else 0)
    return {"router": Count(cfg.num_experts * h, cfg.num_experts * h),
            "routed_experts": Count(cfg.num_experts * expert, cfg.topk * expert),
            "shared_experts": Count(shared, shared)}


def mtp_depth(cfg: ModelConfig) -> Count:
    """One MTP depth: enorm, hnorm, eh_proj [h, 2h], one full-attention MoE layer (with its norms), final norm."""
    h = cfg.hidden_size
    own = 3 * h + 2 * h * h + 2 * h + attention_weights(cfg) + mixer_norms(cfg, ATTENTION)
    layer = Count(own, own)
    for c in moe_counts(cfg).values():
        layer = layer + c
    return layer


def account(cfg: ModelConfig) -> Accounting:
    h = cfg.hidden_size
    parts = {name: Count(0, 0) for name in COMPONENTS}
    parts["embeddings"] = Count(cfg.vocab_size * h, h)
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
    parts["output_head"] = Count(head, cfg.vocab_size * h)
    norms = h  # final norm
    for mixer, mlp in zip(cfg.mixer_types, cfg.mlp_types):
        norms += 2 * h + mixer_norms(cfg, mixer)  # input and pre-MLP norms
        if mixer == ATTENTION:
            parts["attention"] += Count(attention_weights(cfg), attention_weights(cfg))
        else:
            parts["gdn"] += Count(gdn_weights(cfg), gdn_weights(cfg))
        if mlp == MOE:
            for name, c in moe_counts(cfg).items():
                parts[name] += c
        elif mlp == DENSE_MLP:
            dense = swiglu(h, cfg.dense_ffn_hidden_size)
            parts["dense_mlp"] += Count(dense, dense)
    parts["norms"] = Count(norms, norms)
    parts["mtp"] = mtp_depth(cfg).times(cfg.mtp_num_layers)
    return Accounting(parts)


def human(n: float | None) -> str:
    if n is None:
        return ""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def human_bytes(n: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _ratio(after: int | None, before: int | None) -> str:
    return f"{after / before:.3f}" if before and after is not None else ""


def _rows(acc: Accounting) -> list[tuple[str, int | None, int]]:
    rows: list[tuple[str, int | None, int]] = [(n, c.total, c.active) for n, c in acc.components.items()]
    return rows + [("TOTAL (active excl. MTP)", acc.total, acc.active),
                   ("active non-embedding", None, acc.active_non_embedding)]


def format_table(before: Accounting, after: Accounting | None = None) -> str:
    """Per component total and active parameters; with `after`, the student beside the source and their ratio."""
    if after is None:
        head = f"{'component':<26}{'total':>12}{'active':>12}"
        lines = [head, "-" * len(head)] + [f"{n:<26}{human(t):>12}{human(a):>12}" for n, t, a in _rows(before)]
    else:
        head = (f"{'component':<26}{'total before':>14}{'after':>12}{'ratio':>8}"
                f"{'active before':>15}{'after':>12}{'ratio':>8}")
        lines = [head, "-" * len(head)]
        lines += [f"{n:<26}{human(t):>14}{human(t2):>12}{_ratio(t2, t):>8}{human(a):>15}{human(a2):>12}"
                  f"{_ratio(a2, a):>8}" for (n, t, a), (_, t2, a2) in zip(_rows(before), _rows(after))]
    lines.append("-" * len(lines[0]))
    for label, acc in [("source", before)] + ([("target", after)] if after else []):
        lines.append(f"{label} checkpoint: {human_bytes(acc.checkpoint_bytes(2))} bf16, "
                     f"{human_bytes(acc.checkpoint_bytes(4))} fp32")
    lines.append("active = read per token: one embedding row, the whole output head, topk routed experts per layer")
    return "\n".join(lines)
