"""Header-only HF checkpoints: real config.json and safetensors headers (every tensor's name, dtype, shape and
offsets) whose data region is a sparse hole, so a recipe can be validated and planned against an 80B teacher
without writing or allocating its 160 GB. Reading a tensor's data gives zeros; nothing here is meant to be run.

`qwen3_next_hf_shapes` lists the hub layout of a Qwen3-Next checkpoint from its config (per-expert tensors, the
`mtp.*` tensors transformers drops); tests check it against a tiny checkpoint transformers writes.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

Shapes = dict[str, tuple[int, ...]]


def qwen3_next_hf_shapes(hf: dict[str, Any], mtp_layers: int = 1) -> Shapes:
    h, v = hf["hidden_size"], hf["vocab_size"]
    d, heads, groups = hf["head_dim"], hf["num_attention_heads"], hf["num_key_value_heads"]
    hk, hv = hf["linear_num_key_heads"], hf["linear_num_value_heads"]
    kd, vd = hk * hf["linear_key_head_dim"], hv * hf["linear_value_head_dim"]
    f, sf, e = hf["moe_intermediate_size"], hf["shared_expert_intermediate_size"], hf["num_experts"]
    out: Shapes = {"model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "model.norm.weight": (h,)}

    def attention(p: str) -> None:
        out.update({p + "self_attn.q_proj.weight": (2 * heads * d, h), p + "self_attn.k_proj.weight": (groups * d, h),
                    p + "self_attn.v_proj.weight": (groups * d, h), p + "self_attn.o_proj.weight": (h, heads * d),
                    p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})

    def moe(p: str) -> None:
        out.update({p + "mlp.gate.weight": (e, h), p + "mlp.shared_expert.gate_proj.weight": (sf, h),
                    p + "mlp.shared_expert.up_proj.weight": (sf, h), p + "mlp.shared_expert.down_proj.weight": (h, sf),
                    p + "mlp.shared_expert_gate.weight": (1, h), p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,)})
        for x in range(e):
            out.update({f"{p}mlp.experts.{x}.gate_proj.weight": (f, h), f"{p}mlp.experts.{x}.up_proj.weight": (f, h),
                        f"{p}mlp.experts.{x}.down_proj.weight": (h, f)})

    types = hf.get("layer_types") or [
        "full_attention" if (i + 1) % hf["full_attention_interval"] == 0 else "linear_attention"
        for i in range(hf["num_hidden_layers"])]
    for i, kind in enumerate(types):
        p = f"model.layers.{i}."
        if kind == "full_attention":
            attention(p)
        else:
            out.update({p + "linear_attn.in_proj_qkvz.weight": (2 * kd + 2 * vd, h),
                        p + "linear_attn.in_proj_ba.weight": (2 * hv, h),
                        p + "linear_attn.conv1d.weight": (2 * kd + vd, 1, hf["linear_conv_kernel_dim"]),
                        p + "linear_attn.dt_bias": (hv,), p + "linear_attn.A_log": (hv,),
                        p + "linear_attn.norm.weight": (hf["linear_value_head_dim"],),
                        p + "linear_attn.out_proj.weight": (h, vd)})
        moe(p)
    if mtp_layers:
        out.update({"mtp.fc.weight": (h, 2 * h), "mtp.norm.weight": (h,), "mtp.pre_fc_norm_embedding.weight": (h,),
                    "mtp.pre_fc_norm_hidden.weight": (h,)})
        for i in range(mtp_layers):
            attention(f"mtp.layers.{i}.")
            moe(f"mtp.layers.{i}.")
    return out


def write_header_only(out_dir: Path, hf_config: dict[str, Any], shapes: Shapes, dtype: str = "BF16",
                      shard_bytes: int = 5 * 10**9) -> int:
    """config.json, hub-like shards whose data is a sparse hole, and the index; returns the bytes they claim."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    item = {"BF16": 2, "F32": 4}[dtype]
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, shape in shapes.items():
        n = item
        for s in shape:
            n *= s
        if size + n > shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += n
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, shape in shard.items():
            n = item
            for s in shape:
                n *= s
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out_dir / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)  # a hole: no block is written or allocated
        total += offset
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total
