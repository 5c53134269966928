"""Deployment efficiency of HF checkpoints with transformers and/or vLLM: peak memory, prefill latency and decode
tokens/s.

Give the teacher first and its students after it (`--model` repeated): the table shows each model's figures and
its ratios to the first (parameters, peak memory, prefill and decode speed-ups), the paper's efficiency table.
Each model runs in a fresh process on random prompts of --batch x --prompt-len tokens: --warmup untimed rounds,
then --repeats timed rounds of one prefill and --gen-len greedy decode steps through the KV cache; medians are
reported. --engine vllm (with or instead of transformers) measures the same prompts in vLLM, in a worker under
the vLLM environment's interpreter (`make vllm-env`, or --vllm-python), on a warm engine, and checks its greedy
tokens against transformers' (the table shows the agreement; a disagreement is also warned about). Peak memory is
what loading and running the model adds (CUDA: peak allocated; CPU: peak resident set minus the resident set
before loading). --json prints {"models": [{"path", "params", "peak_memory_bytes", "prefill_s",
"decode_tokens_per_s", "engine", "greedy_checked", "greedy_matching"}], "settings": {...}}. Megatron checkpoints:
`export` them to HF first.
"""
from __future__ import annotations

import argparse

from megatron_slim.engines.bench_inference_job import DTYPES, ENGINES, BenchInferenceJob, run_bench_inference
from megatron_slim.runtime.outputs import Output

HELP = "peak memory, prefill latency and decode throughput of HF checkpoints (teacher vs students)"


OUTPUTS: tuple[Output, ...] = ()  # prints only

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True,
                   help="HF checkpoint directory (repeat; the first is the baseline of the ratios)")
    p.add_argument("--batch", type=int, default=1, help="prompts per batch")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens")
    p.add_argument("--gen-len", type=int, default=64, help="greedy tokens decoded per prompt")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="weights and compute dtype")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (medians reported)")
    p.add_argument("--engine", action="append", choices=ENGINES, default=None,
                   help="who runs the models (repeat for both; default transformers): vllm runs a worker under "
                        "the vLLM environment's interpreter and checks its greedy tokens against transformers")
    p.add_argument("--vllm-python", default=None,
                   help="the vLLM environment's interpreter (default: .vllm-venv/bin/python, `make vllm-env`)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def job(args: argparse.Namespace) -> BenchInferenceJob:
    """The parsed flags as the library's job."""
    return BenchInferenceJob(models=tuple(args.model), batch=args.batch, prompt_len=args.prompt_len,
                             gen_len=args.gen_len, dtype=args.dtype, device=args.device, warmup=args.warmup,
                             repeats=args.repeats, engines=tuple(args.engine or ("transformers",)),
                             vllm_python=args.vllm_python, json=args.json)


def run(args: argparse.Namespace) -> int:
    return run_bench_inference(job(args))
