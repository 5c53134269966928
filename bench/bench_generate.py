"""Greedy generation (lm-eval `generate_until`, MTP acceptance) with megatron-core's static KV cache versus the
full-prefix loop it replaces where it serves.

Builds a random Megatron model from a config (default Qwen3-MoE-shaped, 8 layers / hidden 256 / 16 experts, top-4;
`--family qwen3_next`: three Gated DeltaNet layers per full-attention layer, and a shared expert),
then generates --gen-len greedy tokens for --batch prompts of --prompt-len tokens with eval/generate.py twice:
    full prefix: every step forwards each row's whole prefix (O(length^2) compute; the baseline)
    KV cache:    one prefill, then one token per row per forward (megatron-core's static KV cache; Gated DeltaNet
                 layers keep their conv and recurrent states: models/gdn.py)
Reported: the median wall time of --repeats runs after one warm-up, generated tokens/s, and the speed-up
(full prefix / KV cache); both must give the same tokens. The ideal speed-up, for layers whose cost grows with
the positions they forward, is the ratio of positions forwarded:

    ideal = sum_{i<G} (P + i) / (P + G - 1)     (full prefix: every prefix; cache: the prompt once, then 1 per step)

Small decode steps are dominated by per-layer fixed costs (routing, dispatch, kernel launches), so measured
speed-ups sit well below it, more so on CPU.

Device: CUDA when available (the model in bf16 with --bf16), else CPU with gloo and megatron_slim's cpu_compat.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_generate.py
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_generate.py --family qwen3_next --prompt-len 512 --gen-len 128
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from _common import small_hf_config


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=("qwen3_moe", "qwen3_next"), default="qwen3_moe")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bf16", action="store_true", help="bf16 weights (GPU)")
    return p.parse_args()


def main() -> None:
    a = parse_args()
    from megatron_slim.eval.generate import kv_cache_blocker
    from megatron_slim.eval.harness import greedy_generate
    from megatron_slim.models.builder import BuildOptions, build_model
    from megatron_slim.models.registry import model_config_from_hf
    from megatron_slim.runtime.distributed import init_distributed, init_model_parallel
    from megatron_slim.runtime.layout import ParallelLayout

    init_distributed()  # one local process (NCCL on a GPU, gloo on CPU)
    parallel = ParallelLayout()
    init_model_parallel(parallel, seed=1)
    dtype = torch.bfloat16 if a.bf16 else torch.float32
    hf = small_hf_config(a, max_positions=max(4096, a.prompt_len + a.gen_len))
    model = build_model(model_config_from_hf(hf), parallel, BuildOptions(params_dtype=dtype))
    model.eval()
    if (why := kv_cache_blocker(model)) is not None:
        raise SystemExit(f"the KV cache cannot serve this model: {why}")
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, a.vocab, (a.batch, a.prompt_len), generator=gen).tolist()

    def run(kv_cache: bool) -> tuple[float, list[list[int]]]:
        times, out = [], []
        for i in range(1 + a.repeats):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = greedy_generate(model, prompts, a.gen_len, lambda t: False, batch_size=a.batch,
                                  micro_batch=a.batch, kv_cache=kv_cache)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i:  # the first run warms up
                times.append(time.perf_counter() - start)
        return statistics.median(times), out

    full_s, full = run(False)
    cached_s, cached = run(True)
    tokens = a.batch * a.gen_len
    p, g = a.prompt_len, a.gen_len
    ideal = sum(p + i for i in range(g)) / (p + g - 1)
    print(f"model: {a.family}, {a.layers} layers, hidden {a.hidden}, {a.experts} experts top-{a.topk}, "
          f"vocab {a.vocab}; "
          f"batch {a.batch}, prompt {p}, {g} new tokens; {'cuda' if torch.cuda.is_available() else 'cpu'}, "
          f"median of {a.repeats}")
    print(f"full prefix : {full_s:8.3f} s  {tokens / full_s:9.1f} tokens/s")
    print(f"KV cache    : {cached_s:8.3f} s  {tokens / cached_s:9.1f} tokens/s")
    print(f"speed-up    : {full_s / cached_s:8.2f}x  (matmul-bound ideal {ideal:.1f}x)")
    print(f"same tokens : {'yes' if full == cached else 'NO'}")
    dist.destroy_process_group()
    if full != cached:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
