"""Throughput and peak memory of `convert hf-to-mcore` / `convert mcore-to-hf` versus a plain copy of the same bytes.

Writes a synthetic hub-style HF checkpoint (random bf16 weights, ~1 GB safetensors shards in state-dict order,
index json, config.json) of a Qwen3-Next- or Qwen3-MoE-shaped model sized by flags, then, in one run and on the
same disk:
  1. `cp -r` of the HF directory,            2. `convert hf-to-mcore` (CLI subprocess),
  3. `cp -r` of the Megatron directory,      4. `convert mcore-to-hf` (CLI subprocess),
and checks that the round-tripped HF checkpoint is bit-exact with the original, shard by shard, streaming.

Every step reads its input from disk (evicted from the page cache with posix_fadvise(DONTNEED); code stays
cached) and its time includes an fsync of every output file, so each step is timed until its output is on disk
(DCP fsyncs its files itself; cp and the safetensors writer leave that to the kernel). Peak RSS is the conversion
process's VmHWM; for hf-to-mcore plus that of its layout child (megatron-core's meta model; run on its own as the
step "layout child" to measure it), an upper bound since the two peaks need not coincide. A `--dry-run` of each
direction (imports, layout, headers; no tensor data) gives the fixed start-up cost in time and memory;
hf-to-mcore's real run overlaps the layout with streaming, so its "ratio w/o start-up" understates it.
`--repeat N` runs the whole sequence N times and keeps each step's best time (the machine is shared) and highest
peak RSS.

Targets (#26): mcore-to-hf/copy <= 1.25 (its tensors mostly only move bytes: copied file to file, by the kernel
or, where source and destination offsets differ modulo a page, by two threads as they check them), hf-to-mcore/copy
<= 2.0; the ratio of CPU seconds is printed beside the wall-time one (on a shared machine it is the steadier
figure); peak RSS a small multiple of the largest group of tensors that
must be held together (one layer's experts, E*3*F*H*2 bytes, or the largest single tensor such as the embedding if
that is bigger), independent of model size.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_convert.py                      # ~3 GB Qwen3-Next + MTP
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_convert.py --family qwen3_moe --layers 24 --no-mtp
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import GB, add_model_arguments, dir_bytes, evict, hf_config, hf_shapes, nbytes, run_step, write_synthetic
from safetensors import safe_open


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
    add_model_arguments(p)
    p.add_argument("--family", choices=["qwen3_next", "qwen3_moe"], default="qwen3_next")
    p.add_argument("--mtp", action=argparse.BooleanOptionalAction, default=True,
                   help="Qwen3-Next MTP tensors (mtp.*; ignored for qwen3_moe)")
    p.add_argument("--repeat", type=int, default=1, help="runs of the copy/convert sequence (best time kept)")
    a = p.parse_args()

    cfg = hf_config(a)
    shapes = hf_shapes(cfg, a.mtp and a.family == "qwen3_next")
    model_bytes = sum(nbytes(s) for s in shapes.values())
    experts = a.experts * 3 * a.moe_ffn * a.hidden * 2
    largest = max(nbytes(s) for s in shapes.values())
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
            print(f"  {name}: {seconds:.1f} s (CPU {cpu:.1f} s)" + (f", peak RSS {rss / GB:.2f} GB" if rss else "")
                  + f"  [load average {os.getloadavg()[0]:.1f}]", flush=True)

        layout_dir = root / "layout-child"  # what hf-to-mcore gives its layout child (removed if it is killed)
        layout_dir.mkdir()
        layout_source = layout_dir / "source.json"
        layout_source.write_text(json.dumps({"hf_dir": str(hf)}))
        for r in range(a.repeat):
            print(f"run {r + 1}/{a.repeat} (load average {os.getloadavg()[0]:.1f})")
            step("dry hf-to-mcore", hf, cli("hf-to-mcore", "--hf", str(hf), "--out", str(mc), "--dry-run"))
            step("layout child", hf, ["-m", "megatron_slim.checkpoint.layout", str(layout_source),
                                      str(layout_dir / "layout.json"), str(os.getpid())])
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
              f"{'copy CPU s':>10} {'convert CPU s':>13} {'CPU ratio':>9} "
              f"{'start-up s':>10} {'ratio w/o start-up':>18} {'peak RSS GB':>11} {'RSS/group':>9} "
              f"{'(RSS-start-up)/group':>20} {'RSS/model':>9}")
        ratios = {}
        for name, src in (("hf-to-mcore", "HF"), ("mcore-to-hf", "mcore")):
            (copy_s, copy_cpu, _), (conv_s, conv_cpu, rss), (dry_s, _, dry_rss) = (best[f"copy {src}"], best[name],
                                                                                   best[f"dry {name}"])
            if name == "hf-to-mcore":  # its layout child runs alongside: count both peaks (an upper bound)
                rss, dry_rss = rss + best["layout child"][2], dry_rss + best["layout child"][2]
            ratios[name] = conv_s / copy_s
            print(f"{name:<12} {sizes[src] / GB:>5.2f} {copy_s:>6.1f} {sizes[src] / copy_s / 1e6:>5.0f} {conv_s:>9.1f} "
                  f"{sizes[src] / conv_s / 1e6:>5.0f} {conv_s / copy_s:>5.2f}x {copy_cpu:>10.1f} {conv_cpu:>13.1f} "
                  f"{conv_cpu / max(copy_cpu, 1e-9):>8.2f}x {dry_s:>10.1f} "
                  f"{(conv_s - dry_s) / copy_s:>17.2f}x {rss / GB:>11.2f} {rss / group:>8.2f}x "
                  f"{(rss - dry_rss) / group:>19.2f}x {rss / model_bytes:>8.3f}x")
        print("targets (wall): mcore-to-hf/copy <= 1.25x "
              + ("met" if ratios["mcore-to-hf"] <= 1.25 else "MISSED") + ", hf-to-mcore/copy <= 2.00x "
              + ("met" if ratios["hf-to-mcore"] <= 2.0 else "MISSED")
              + "; start-up = a --dry-run of that direction (imports, layout, headers; peak RSS "
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
