"""Time and peak memory of `megatron-slim prune` versus a plain copy of the bytes it writes.

Generates the synthetic hub-style Qwen3-Next checkpoint of _common.py (random bf16, ~1 GB shards, index,
config; ~3 GB with MTP by default) and a SlimQwen-shaped plan: 3/4 of the layers (hybrid pattern kept), 3/4 of
the hidden channels, half the experts by partial preservation (a quarter intact, a quarter bases that each absorb
two experts), MTP layer pruned alike. Then, each step reading its input cold (evicted from the page cache) and
timed until its output is synced to disk:
  1. per output format (HF, Megatron): `prune --dry-run` (imports, headers, plan check, meta-tensor planning:
     the fixed start-up cost), then `prune`, then `cp -r` of its output (the baseline),
and spot-checks the HF output against the source (an intact expert and the embeddings, channel-selected).

Targets: prune/copy-of-output small (prune reads all input bytes, merges and writes; the copy only moves the
output), and peak RSS a small multiple of one source layer's experts (E*3*F*H*2 bytes), whatever the model size.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_prune.py
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_prune.py --layers 16 --experts 64
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import GB, add_model_arguments, dir_bytes, evict, hf_config, hf_shapes, nbytes, run_step, write_synthetic
from safetensors import safe_open

from megatron_slim.checkpoint.source import plan_hf_to_mcore
from megatron_slim.compress.plan import CompressionPlan
from megatron_slim.compress.plan_check import implied_target


def slimqwen_plan(hf_dir: Path, seed: int) -> CompressionPlan:
    """Drop every 4th linear-attention layer, a quarter of the hidden channels and half the experts (merged)."""
    src = plan_hf_to_mcore(hf_dir)[0]
    gen = torch.Generator().manual_seed(seed)
    layers = [i for i in range(src.num_layers) if i % 4 != 1]
    hidden = sorted(torch.randperm(src.hidden_size, generator=gen)[: src.hidden_size * 3 // 4].tolist())
    e = src.num_experts
    order = torch.randperm(e, generator=gen).tolist()
    intact, bases, rest = order[: e // 4], order[e // 4: e // 2], order[e // 2:]
    slots = [[(x, 1.0)] for x in intact] + [[(b, 0.5), (rest[2 * i], 0.25), (rest[2 * i + 1], 0.25)]
                                            for i, b in enumerate(bases)]
    prefixes = [f"layers.{i}" for i in layers] + [f"mtp.{d}" for d in range(src.mtp_num_layers)]
    plan = CompressionPlan(source=src, target=src, layers=layers, hidden_channels=hidden,
                           experts={p: slots for p in prefixes})
    problems: list[str] = []
    plan.target = implied_target(plan, problems)
    if problems:
        raise SystemExit("\n".join(problems))
    return plan


def spot_check(src: Path, out: Path, plan: CompressionPlan) -> list[str]:
    """An intact expert of the first kept layer and the embeddings equal the source's, channel-selected."""
    def get(d: Path, key: str) -> torch.Tensor:
        for f in d.glob("*.safetensors"):
            with safe_open(f, "pt") as h:
                if key in h.keys():
                    return h.get_tensor(key)
        raise KeyError(key)

    hidden = torch.tensor(plan.hidden_channels)
    i = plan.layers[0]
    e = plan.experts[f"layers.{i}"][0][0][0]
    pairs = [("model.embed_tokens.weight", "model.embed_tokens.weight", lambda t: t[:, hidden]),
             (f"model.layers.{i}.mlp.experts.{e}.down_proj.weight", "model.layers.0.mlp.experts.0.down_proj.weight",
              lambda t: t[hidden])]
    return [k for k, k_out, cut in pairs if not torch.equal(cut(get(src, k)), get(out, k_out))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--align-neurons", action="store_true", help="prune with --align-neurons")
    a = p.parse_args()
    a.family = "qwen3_next"

    cfg = hf_config(a)
    shapes = hf_shapes(cfg, mtp=True)
    model_bytes = sum(nbytes(s) for s in shapes.values())
    layer_experts = a.experts * 3 * a.moe_ffn * a.hidden * 2
    root = Path(tempfile.mkdtemp(prefix="bench_prune_", dir=a.workdir))
    print(f"qwen3_next: {a.layers} layers + MTP, hidden {a.hidden}, {a.experts} experts x ffn {a.moe_ffn}: "
          f"{model_bytes / GB:.2f} GB bf16; one layer's experts {layer_experts / GB:.3f} GB")
    print(f"workdir {root}  (cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f})")
    try:
        src = root / "src"
        t0 = time.perf_counter()
        write_synthetic(src, cfg, shapes, int(a.shard_gb * GB), seed=0)
        print(f"generated {src} in {time.perf_counter() - t0:.1f} s")
        plan = slimqwen_plan(src, seed=0)
        plan.save(root / "plan.json")
        t = plan.target
        print(f"plan: {t.num_layers} layers ({t.hybrid_pattern}), hidden {t.hidden_size}, {t.num_experts} experts")
        extra = ["--align-neurons"] if a.align_neurons else []

        def prune(out: Path, *args: str, dry: bool = False) -> tuple[float, int]:
            evict(src)
            seconds, _, rss = run_step(["megatron-slim", "prune", "--plan", str(root / "plan.json"), "--in", str(src),
                                        "--out", str(out), "--no-progress", *extra, *args]
                                       + (["--dry-run"] if dry else []), None if dry else out)
            return seconds, rss

        def copy(out: Path) -> float:
            evict(out)
            seconds, _, _ = run_step(["cp", "-r", str(out), str(root / "copy")], root / "copy")
            shutil.rmtree(root / "copy")
            return seconds

        rows = []
        for fmt in ("hf", "mcore"):
            out = root / fmt
            dry_s, dry_rss = prune(out, "--out-format", fmt, dry=True)
            seconds, rss = prune(out, "--out-format", fmt)
            rows.append((fmt, dir_bytes(out), seconds, copy(out), rss, dry_s, dry_rss))
            print(f"  prune -> {fmt}: {seconds:.1f} s, peak RSS {rss / GB:.2f} GB (dry run {dry_s:.1f} s, "
                  f"{dry_rss / GB:.2f} GB)", flush=True)
        print(f"\ninput {dir_bytes(src) / GB:.2f} GB read cold; outputs synced to disk")
        print(f"{'output':<6} {'GB':>5} {'prune s':>8} {'copy out s':>10} {'ratio':>6} {'ratio w/o start-up':>18} "
              f"{'peak RSS GB':>11} {'(RSS-start-up)/layer experts':>28}")
        for fmt, size, seconds, copy_s, rss, dry_s, dry_rss in rows:
            print(f"{fmt:<6} {size / GB:>5.2f} {seconds:>8.1f} {copy_s:>10.1f} {seconds / copy_s:>5.2f}x "
                  f"{(seconds - dry_s) / copy_s:>17.2f}x {rss / GB:>11.2f} {(rss - dry_rss) / layer_experts:>27.2f}x")
        bad = spot_check(src, root / "hf", plan)
        print("spot check (intact expert, embeddings): " + ("PASS" if not bad else f"FAIL {bad}"))
        if bad:
            sys.exit(1)
    finally:
        if a.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
