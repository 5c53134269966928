"""Throughput of the importance pass (compress/importance_hooks.collect: every statistic a recipe collects) against a
plain forward of the same model at the same layout.

Builds a random Megatron model from a config (default Qwen3-Next-shaped: three Gated DeltaNet layers per
full-attention layer, MoE with a shared expert, and one MTP depth; `--family qwen3_moe` for attention-only), then
over the same --sequences x --seq-len random tokens, with --micro-batch:
    forward:    forward_microbatches with nothing done on the logits (the floor any pass over the tokens pays)
    importance: collect(), hooks on every router, expert group, attention/GDN output, MLP, residual norm and layer,
                float64 sums and the LM loss (--layer-loss adds the loss_increase passes, one forward per layer,
                counted as the tokens they forward)
Reported: tokens/s of each by wall time and by this process's CPU time (user + sys, all threads; steadier than wall
time on a shared machine), medians of --repeats rounds after one warm-up round, each round running both passes
one after the other, plus the best round's CPU time (the least disturbed by other load); importance/forward for
each. On a loaded machine run with OMP_NUM_THREADS=1: OpenMP threads that spin while waiting for a core bill CPU
time that is no work.
Target on the CPU: importance >= 0.90x forward.

Device: CUDA when available (bf16 weights with --bf16), else CPU with gloo and megatron_slim's cpu_compat; one
process (TP = PP = EP = 1).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_importance.py
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_importance.py --family qwen3_moe --seq-len 512
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from _common import small_hf_config


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=("qwen3_moe", "qwen3_next"), default="qwen3_next")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--mtp", type=int, default=1, help="MTP depths (Qwen3-Next only)")
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--layer-loss", action="store_true", help="also the loss_increase passes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bf16", action="store_true", help="bf16 weights (GPU)")
    return p.parse_args()


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def main() -> None:
    a = parse_args()
    from megatron_slim.compress.importance_hooks import CollectOptions, collect
    from megatron_slim.models.builder import BuildOptions, build_model
    from megatron_slim.models.forward import forward_microbatches
    from megatron_slim.models.registry import model_config_from_hf
    from megatron_slim.runtime.distributed import init_distributed, init_model_parallel
    from megatron_slim.runtime.layout import ParallelLayout

    init_distributed()  # one local process (NCCL on a GPU, gloo on CPU)
    parallel = ParallelLayout()
    init_model_parallel(parallel, seed=1)
    hf = small_hf_config(a, max_positions=max(4096, a.seq_len))
    cfg = model_config_from_hf(hf, mtp_num_layers=a.mtp if a.family == "qwen3_next" else 0)
    model = build_model(cfg, parallel, BuildOptions(params_dtype=torch.bfloat16 if a.bf16 else torch.float32))
    model.eval()
    device = next(model.parameters()).device
    tokens = torch.randint(0, a.vocab, (a.sequences, a.seq_len), generator=torch.Generator().manual_seed(0))
    on_device = tokens.to(device)
    passes = 1 + (cfg.num_layers if a.layer_loss else 0)

    def forward() -> None:
        with torch.no_grad():
            forward_microbatches(model, on_device, a.micro_batch, lambda logits, rows: None)

    def importance() -> None:
        collect(model, cfg, tokens, CollectOptions(micro_batch=a.micro_batch, layer_loss=a.layer_loss,
                                                   progress=False))

    def clocked(fn) -> tuple[float, float]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        w, c = time.perf_counter(), cpu_seconds()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - w, cpu_seconds() - c

    counts = {"forward": tokens.numel(), "importance": tokens.numel() * passes}
    runs: dict[str, list[tuple[float, float]]] = {"forward": [], "importance": []}
    for i in range(1 + a.repeats):  # alternating, so that a burst of load on a shared machine hits both alike
        for name, fn in (("forward", forward), ("importance", importance)):
            t = clocked(fn)
            if i:  # the first round warms up
                runs[name].append(t)
    results = {name: {"wall": counts[name] / statistics.median(w for w, _ in r),
                      "cpu": counts[name] / statistics.median(c for _, c in r),
                      "cpu_best": counts[name] / min(c for _, c in r)} for name, r in runs.items()}
    print(f"model: {a.family}, {a.layers} layers, hidden {a.hidden}, {a.experts} experts top-{a.topk}, vocab "
          f"{a.vocab}, MTP {cfg.mtp_num_layers}; {a.sequences} x {a.seq_len} tokens, micro-batch {a.micro_batch}, "
          f"layer loss {'on' if a.layer_loss else 'off'}; {device.type}, {torch.get_num_threads()} threads, "
          f"median of {a.repeats}")
    for name, r in results.items():
        print(f"{name:<11}: {r['wall']:9.1f} tokens/s (wall)  {r['cpu']:9.1f} tokens/s (CPU time)  "
              f"{r['cpu_best']:9.1f} tokens/s (best CPU time)")
    f, i = results["forward"], results["importance"]
    print(f"importance / forward: {i['wall'] / f['wall']:.3f}x (wall)  {i['cpu'] / f['cpu']:.3f}x (CPU time)  "
          f"{i['cpu_best'] / f['cpu_best']:.3f}x (best CPU time)  target >= 0.90x")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
