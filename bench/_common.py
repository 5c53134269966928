"""Scaffolding shared by the conversion and pruning benches: a synthetic hub-style checkpoint of a Qwen3-Next- or
Qwen3-MoE-shaped model sized by flags, cold-cache steps timed until their output is on disk, and the CLI's peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GB = 1e9
DTYPE = torch.bfloat16
REPO = Path(__file__).resolve().parents[1]


def hf_config(a: argparse.Namespace) -> dict:
    """A config.json of the chosen family and size (the fields transformers and our parsers read)."""
    cfg = dict(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.moe_ffn * 4, num_hidden_layers=a.layers,
               num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, head_dim=a.head_dim, hidden_act="silu",
               max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
               decoder_sparse_step=1, moe_intermediate_size=a.moe_ffn, num_experts_per_tok=min(8, a.experts),
               num_experts=a.experts, norm_topk_prob=True, router_aux_loss_coef=0.001, mlp_only_layers=[],
               initializer_range=0.02, dtype="bfloat16")
    if a.family == "qwen3_moe":
        return dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", use_sliding_window=False,
                    rope_parameters={"rope_theta": 1e6, "rope_type": "default"}, **cfg)
    return dict(architectures=["Qwen3NextForCausalLM"], model_type="qwen3_next",
                rope_parameters={"rope_theta": 1e7, "partial_rotary_factor": 0.25, "rope_type": "default"},
                linear_conv_kernel_dim=4, linear_key_head_dim=a.linear_head_dim,
                linear_value_head_dim=a.linear_head_dim, linear_num_key_heads=a.linear_k_heads,
                linear_num_value_heads=a.linear_v_heads, shared_expert_intermediate_size=a.moe_ffn,
                layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(a.layers)],
                **cfg)


def small_hf_config(a: argparse.Namespace, max_positions: int) -> dict:
    """A small config.json for the in-memory benches (generation, importance): --family, --layers, --hidden,
    --experts, --topk and --vocab; 8 heads, dims from the hidden size."""
    cfg = dict(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden, num_hidden_layers=a.layers,
               num_attention_heads=8, num_key_value_heads=2, head_dim=a.hidden // 8, hidden_act="silu",
               max_position_embeddings=max_positions, rms_norm_eps=1e-6, tie_word_embeddings=False,
               attention_bias=False, decoder_sparse_step=1, moe_intermediate_size=a.hidden // 2,
               num_experts_per_tok=a.topk, num_experts=a.experts, norm_topk_prob=True, router_aux_loss_coef=0.0,
               mlp_only_layers=[], initializer_range=0.02)
    if a.family == "qwen3_moe":
        return dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", use_sliding_window=False,
                    rope_parameters={"rope_theta": 1e6, "rope_type": "default"}, **cfg)
    return dict(architectures=["Qwen3NextForCausalLM"], model_type="qwen3_next",
                rope_parameters={"rope_theta": 1e7, "partial_rotary_factor": 0.25, "rope_type": "default"},
                linear_conv_kernel_dim=4, linear_key_head_dim=a.hidden // 8, linear_value_head_dim=a.hidden // 8,
                linear_num_key_heads=4, linear_num_value_heads=8, shared_expert_intermediate_size=a.hidden // 2,
                layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(a.layers)],
                **cfg)


def hf_shapes(cfg: dict, mtp: bool) -> dict[str, tuple[int, ...]]:
    """On-disk tensor names and shapes, in the order save_pretrained writes them (layer by layer)."""
    h, e, f, d = cfg["hidden_size"], cfg["num_experts"], cfg["moe_intermediate_size"], cfg["head_dim"]
    nh, g = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    nxt = cfg["model_type"] == "qwen3_next"

    def layer(p: str, kind: str) -> dict[str, tuple[int, ...]]:
        out = {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        if kind == "linear_attention":
            nk, nv, dk = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"], cfg["linear_key_head_dim"]
            dv = cfg["linear_value_head_dim"]
            out |= {p + "linear_attn.in_proj_qkvz.weight": (2 * nk * dk + 2 * nv * dv, h),
                    p + "linear_attn.in_proj_ba.weight": (2 * nv, h),
                    p + "linear_attn.conv1d.weight": (2 * nk * dk + nv * dv, 1, cfg["linear_conv_kernel_dim"]),
                    p + "linear_attn.A_log": (nv,), p + "linear_attn.dt_bias": (nv,),
                    p + "linear_attn.norm.weight": (dv,), p + "linear_attn.out_proj.weight": (h, nv * dv)}
        else:
            out |= {p + "self_attn.q_proj.weight": ((2 if nxt else 1) * nh * d, h),
                    p + "self_attn.k_proj.weight": (g * d, h), p + "self_attn.v_proj.weight": (g * d, h),
                    p + "self_attn.o_proj.weight": (h, nh * d),
                    p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
        out[p + "mlp.gate.weight"] = (e, h)
        for i in range(e):
            out |= {p + f"mlp.experts.{i}.gate_proj.weight": (f, h), p + f"mlp.experts.{i}.up_proj.weight": (f, h),
                    p + f"mlp.experts.{i}.down_proj.weight": (h, f)}
        if nxt:
            s = cfg["shared_expert_intermediate_size"]
            out |= {p + "mlp.shared_expert.gate_proj.weight": (s, h), p + "mlp.shared_expert.up_proj.weight": (s, h),
                    p + "mlp.shared_expert.down_proj.weight": (h, s), p + "mlp.shared_expert_gate.weight": (1, h)}
        return out

    kinds = cfg.get("layer_types") or ["full_attention"] * cfg["num_hidden_layers"]
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h)}
    for i, kind in enumerate(kinds):
        shapes |= layer(f"model.layers.{i}.", kind)
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (cfg["vocab_size"], h)}
    if mtp:  # Qwen3-Next's MTP head: fc + norms, one full-attention MoE layer (tests/support/hf_checkpoints.py)
        shapes |= {"mtp.fc.weight": (h, 2 * h), "mtp.norm.weight": (h,), "mtp.pre_fc_norm_embedding.weight": (h,),
                   "mtp.pre_fc_norm_hidden.weight": (h,)}
        shapes |= layer("mtp.layers.0.", "full_attention")
    return shapes


def nbytes(shape: tuple[int, ...]) -> int:
    n = 2
    for s in shape:
        n *= s
    return n


def write_synthetic(out: Path, cfg: dict, shapes: dict[str, tuple[int, ...]], shard_bytes: int, seed: int) -> None:
    """Hub-style shards of at most `shard_bytes`, each written tensor by tensor (data sorted by name, like
    safetensors does), with random normal bf16 values (norm weights around 1)."""
    out.mkdir(parents=True)
    shards: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        if shards[-1] and size + nbytes(shape) > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes(shape)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key in sorted(keys):
            n = nbytes(shapes[key])
            header[key] = {"dtype": "BF16", "shape": list(shapes[key]), "data_offsets": [offset, offset + n]}
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(out / name, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)) + blob)
            for key in sorted(keys):
                t = torch.randn(shapes[key], generator=gen).mul_(0.02)
                if "norm" in key:
                    t.add_(1.0)
                fh.write(memoryview(t.to(DTYPE).reshape(-1).view(torch.uint8).numpy()))
                weight_map[key] = name
    total = sum(nbytes(s) for s in shapes.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.7}))
    sync_tree(out)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _each_file(root: Path, flag: int, advice: int | None = None) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, flag)
            try:
                os.fsync(fd)
                if advice is not None:
                    os.posix_fadvise(fd, 0, 0, advice)
            finally:
                os.close(fd)


def sync_tree(root: Path) -> None:
    """fsync every file under `root` (only this step's output, not what other processes have in flight)."""
    _each_file(root, os.O_RDWR)


def evict(src: Path) -> None:
    """Drop `src`'s files from the page cache, so the next step reads them from disk. Only the data goes cold:
    Python and its libraries stay cached, as they would for anyone converting several models."""
    _each_file(src, os.O_RDONLY, os.POSIX_FADV_DONTNEED)


# Runs a module (the CLI, or the layout child) as a script in-process and records its peak RSS (VmHWM, which exec
# resets; ru_maxrss from wait4 would also count the pages this benchmark process had when it forked the child).
_PEAK_WRAPPER = """import runpy, sys
peak, module, sys.argv = sys.argv[1], sys.argv[2], sys.argv[2:]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
finally:
    with open("/proc/self/status") as f:
        hwm = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(peak, "w") as f:
        f.write(hwm)
"""


def run_step(cmd: list[str], out: Path | None) -> tuple[float, float, int]:
    """(seconds until the command's output `out` is on disk, its CPU seconds, its peak RSS in bytes or 0).
    `cmd` is ["megatron-slim", ...] (the CLI), ["-m", module, ...] (a module run as a script; both measured for
    peak RSS) or any other command line."""
    with tempfile.TemporaryDirectory() as tmp:
        log, peak = Path(tmp) / "log", Path(tmp) / "peak"
        if cmd[0] == "megatron-slim":
            cmd = ["-m", "megatron_slim.cli", *cmd[1:]]
        if cmd[0] == "-m":
            cmd = [sys.executable, "-c", _PEAK_WRAPPER, str(peak), *cmd[1:]]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with open(log, "wb") as log_file:
            start = time.perf_counter()
            rc = subprocess.run(cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT).returncode
            if out is not None and not rc:
                sync_tree(out)
            seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if rc:
            raise SystemExit(f"{' '.join(cmd)} failed ({rc}):\n{log.read_text()[-4000:]}")
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        return seconds, cpu, int(peak.read_text()) * 1024 if peak.exists() else 0


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The synthetic model's size flags, and where the benches work."""
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--moe-ffn", type=int, default=384, help="expert (and shared expert) intermediate size")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--linear-k-heads", type=int, default=16, help="Qwen3-Next Gated DeltaNet key heads")
    p.add_argument("--linear-v-heads", type=int, default=32, help="Qwen3-Next Gated DeltaNet value heads")
    p.add_argument("--linear-head-dim", type=int, default=128)
    p.add_argument("--shard-gb", type=float, default=1.0, help="HF input shard size")
    p.add_argument("--workdir", type=Path, default=None, help="parent of the temp dir (default: the system temp)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
