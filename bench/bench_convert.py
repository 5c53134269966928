"""Throughput and peak memory of `convert hf-to-mcore` / `convert mcore-to-hf` versus a plain copy of the same bytes.

Writes a synthetic hub-style HF checkpoint (random bf16 weights, ~1 GB safetensors shards in state-dict order,
index json, config.json) of a Qwen3-Next- or Qwen3-MoE-shaped model sized by flags, then, in one run and on the
same disk:
  1. `cp -r` of the HF directory,            2. `convert hf-to-mcore` (CLI subprocess),
  3. `cp -r` of the Megatron directory,      4. `convert mcore-to-hf` (CLI subprocess),
and checks that the round-tripped HF checkpoint is bit-exact with the original, shard by shard, streaming.

Every step reads its input from disk (evicted from the page cache with posix_fadvise(DONTNEED); code stays
cached) and its time includes an fsync of every output file, so each step is timed until its output is on disk
(DCP fsyncs its files itself; cp and the safetensors writer leave that to the kernel). Peak RSS is the conversion process's
VmHWM. A `--dry-run` of each direction (imports, meta-device model, headers; no tensor data) gives the fixed
start-up cost in time and memory. `--repeat N` runs the whole sequence N times and keeps each step's best time
(the machine is shared) and highest peak RSS.

Targets: conversion/copy <= 2.0 in both directions; peak RSS a small multiple of the largest group of tensors that
must be held together (one layer's experts, E*3*F*H*2 bytes, or the largest single tensor such as the embedding if
that is bigger), independent of model size.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_convert.py                      # ~3 GB Qwen3-Next + MTP
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_convert.py --family qwen3_moe --layers 24 --no-mtp
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

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
    if mtp:  # Qwen3-Next's MTP head: fc + norms, and one full-attention MoE layer (tests/hf_fixtures.py layout)
        shapes |= {"mtp.fc.weight": (h, 2 * h), "mtp.norm.weight": (h,), "mtp.pre_fc_norm_embedding.weight": (h,),
                   "mtp.pre_fc_norm_hidden.weight": (h,)}
        shapes |= layer("mtp.layers.0.", "full_attention")
    return shapes


def _nbytes(shape: tuple[int, ...]) -> int:
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
        if shards[-1] and size + _nbytes(shape) > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += _nbytes(shape)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key in sorted(keys):
            n = _nbytes(shapes[key])
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
    total = sum(_nbytes(s) for s in shapes.values())
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


# Runs the CLI in-process and records its peak RSS (VmHWM, which exec resets; ru_maxrss from wait4 would also count
# the pages this benchmark process had when it forked the child).
_PEAK_WRAPPER = """import sys
from megatron_slim.cli import main
try:
    rc = main(sys.argv[2:])
finally:
    with open("/proc/self/status") as f:
        hwm = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(sys.argv[1], "w") as f:
        f.write(hwm)
sys.exit(rc)
"""


def run_step(cmd: list[str], out: Path | None) -> tuple[float, float, int]:
    """(seconds until the command's output `out` is on disk, its CPU seconds, the CLI's peak RSS in bytes or 0)."""
    with tempfile.TemporaryDirectory() as tmp:
        log, peak = Path(tmp) / "log", Path(tmp) / "peak"
        if cmd[0] == "megatron-slim":
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


def cli(*args: str) -> list[str]:
    return ["megatron-slim", "convert", *args, "--no-progress"]


def verify_round_trip(orig: Path, back: Path) -> list[str]:
    """Mismatches between two HF checkpoints: names, dtypes, shapes, bits (tensor by tensor, mmapped)."""
    maps = [json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
            if (d / "model.safetensors.index.json").is_file() else None for d in (orig, back)]
    if maps[1] is None:
        with safe_open(back / "model.safetensors", "pt") as f:
            maps[1] = dict.fromkeys(f.keys(), "model.safetensors")
    problems = []
    if set(maps[0]) != set(maps[1]):
        problems.append(f"key sets differ: {sorted(set(maps[0]) ^ set(maps[1]))[:10]}")
    handles = {name: safe_open(back / name, "pt") for name in set(maps[1].values())}
    by_shard: dict[str, list[str]] = {}
    for key, shard in maps[0].items():
        by_shard.setdefault(shard, []).append(key)
    for shard, keys in sorted(by_shard.items()):
        with safe_open(orig / shard, "pt") as f:
            for key in keys:
                if key not in maps[1]:
                    continue
                a, b = f.get_tensor(key), handles[maps[1][key]].get_tensor(key)
                if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.view(torch.int16),
                                                                               b.view(torch.int16)):
                    problems.append(f"{key}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
    cfgs = [json.loads((d / "config.json").read_text())["architectures"] for d in (orig, back)]
    if cfgs[0] != cfgs[1]:
        problems.append(f"architectures {cfgs[0]} vs {cfgs[1]}")
    return problems


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["qwen3_next", "qwen3_moe"], default="qwen3_next")
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
    p.add_argument("--mtp", action=argparse.BooleanOptionalAction, default=True,
                   help="Qwen3-Next MTP tensors (mtp.*; ignored for qwen3_moe)")
    p.add_argument("--shard-gb", type=float, default=1.0, help="HF input shard size")
    p.add_argument("--workdir", type=Path, default=None, help="parent of the temp dir (default: the system temp)")
    p.add_argument("--repeat", type=int, default=1, help="runs of the copy/convert sequence (best time kept)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    a = p.parse_args()

    cfg = hf_config(a)
    shapes = hf_shapes(cfg, a.mtp and a.family == "qwen3_next")
    model_bytes = sum(_nbytes(s) for s in shapes.values())
    experts = a.experts * 3 * a.moe_ffn * a.hidden * 2
    largest = max(_nbytes(s) for s in shapes.values())
    group = max(experts, largest)  # the most a conversion must hold at once: one layer's experts, or one tensor
    if a.workdir:
        a.workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=a.workdir))
    print(f"{a.family}: {a.layers} layers, hidden {a.hidden}, {a.experts} experts x ffn {a.moe_ffn}, vocab {a.vocab}"
          f"{', MTP' if a.mtp and a.family == 'qwen3_next' else ''}: {len(shapes)} tensors, "
          f"{model_bytes / GB:.2f} GB bf16; group = max(one layer's experts E*3*F*H*2 = {experts / GB:.3f} GB, "
          f"largest tensor {largest / GB:.3f} GB)")
    print(f"workdir {root}  (cpus {os.cpu_count()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"load average {os.getloadavg()[0]:.1f})")
    try:
        hf, mc, back = root / "hf", root / "mcore", root / "back"
        t0 = time.perf_counter()
        write_synthetic(hf, cfg, shapes, int(a.shard_gb * GB), seed=0)
        print(f"generated {hf} in {time.perf_counter() - t0:.1f} s "
              f"({len(list(hf.glob('*.safetensors')))} shards)")

        best: dict[str, tuple[float, float, int]] = {}  # step -> best wall s, CPU s of that run, highest RSS

        def step(name: str, src: Path, cmd: list[str], out: Path | None = None) -> None:
            evict(src)
            seconds, cpu, rss = run_step(cmd, out)
            old_s, old_cpu, old_rss = best.get(name, (float("inf"), 0.0, 0))
            best[name] = (*min((seconds, cpu), (old_s, old_cpu)), max(rss, old_rss))
            print(f"  {name}: {seconds:.1f} s (CPU {cpu:.1f} s)" + (f", peak RSS {rss / GB:.2f} GB" if rss else ""),
                  flush=True)

        for r in range(a.repeat):
            print(f"run {r + 1}/{a.repeat} (load average {os.getloadavg()[0]:.1f})")
            step("dry hf-to-mcore", hf, cli("hf-to-mcore", "--hf", str(hf), "--out", str(mc), "--dry-run"))
            step("copy HF", hf, ["cp", "-r", str(hf), str(root / "copy")], root / "copy")
            shutil.rmtree(root / "copy")
            shutil.rmtree(mc, ignore_errors=True)  # the previous run's output, deleted outside the timing
            step("hf-to-mcore", hf, cli("hf-to-mcore", "--hf", str(hf), "--out", str(mc)), mc)
            step("dry mcore-to-hf", mc, cli("mcore-to-hf", "--mcore", str(mc), "--out", str(back), "--dry-run"))
            step("copy mcore", mc, ["cp", "-r", str(mc), str(root / "copy")], root / "copy")
            shutil.rmtree(root / "copy")
            shutil.rmtree(back, ignore_errors=True)
            step("mcore-to-hf", mc, cli("mcore-to-hf", "--mcore", str(mc), "--out", str(back)), back)

        sizes = {"HF": dir_bytes(hf), "mcore": dir_bytes(mc)}
        print(f"\nbest of {a.repeat}; every step reads its input cold and ends with its output synced to disk")
        print(f"{'direction':<12} {'GB':>5} {'copy s':>6} {'MB/s':>5} {'convert s':>9} {'MB/s':>5} {'ratio':>6} "
              f"{'start-up s':>10} {'ratio w/o start-up':>18} {'peak RSS GB':>11} {'RSS/group':>9} "
              f"{'(RSS-start-up)/group':>20} {'RSS/model':>9}")
        ratios = []
        for name, src in (("hf-to-mcore", "HF"), ("mcore-to-hf", "mcore")):
            (copy_s, _, _), (conv_s, _, rss), (dry_s, _, dry_rss) = (best[f"copy {src}"], best[name],
                                                                     best[f"dry {name}"])
            ratios.append(conv_s / copy_s)
            print(f"{name:<12} {sizes[src] / GB:>5.2f} {copy_s:>6.1f} {sizes[src] / copy_s / 1e6:>5.0f} {conv_s:>9.1f} "
                  f"{sizes[src] / conv_s / 1e6:>5.0f} {conv_s / copy_s:>5.2f}x {dry_s:>10.1f} "
                  f"{(conv_s - dry_s) / copy_s:>17.2f}x {rss / GB:>11.2f} {rss / group:>8.2f}x "
                  f"{(rss - dry_rss) / group:>19.2f}x {rss / model_bytes:>8.3f}x")
        print("target conversion/copy <= 2.00x: " + ("met" if max(ratios) <= 2.0 else "MISSED")
              + f"; start-up = a --dry-run of that direction (imports, layout, headers; peak RSS "
              f"{best['dry hf-to-mcore'][2] / GB:.2f} / {best['dry mcore-to-hf'][2] / GB:.2f} GB)")
        print("CPU seconds of those runs (the rest of a wall time is waiting for the disk or for a core): "
              + ", ".join(f"{k} {v[1]:.1f}" for k, v in best.items()))

        t0 = time.perf_counter()
        problems = verify_round_trip(hf, back)
        print(f"round trip bit-exact ({len(shapes)} tensors, {time.perf_counter() - t0:.1f} s): "
              + ("PASS" if not problems else "FAIL\n  " + "\n  ".join(problems[:20])))
        if problems:
            sys.exit(1)
    finally:
        if a.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
