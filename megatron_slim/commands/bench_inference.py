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

from megatron_slim.commands.options import add_job_arguments, job_from_args
from megatron_slim.engines.bench_inference_job import BenchInferenceJob, run_bench_inference
from megatron_slim.runtime.outputs import Output

HELP = "peak memory, prefill latency and decode throughput of HF checkpoints (teacher vs students)"


OUTPUTS: tuple[Output, ...] = ()  # prints only

def add_arguments(p: argparse.ArgumentParser) -> None:
    add_job_arguments(p, BenchInferenceJob)  # each flag's name, default and help: BenchInferenceJob's fields


def job(args: argparse.Namespace) -> BenchInferenceJob:
    """The parsed flags as the library's job."""
    return job_from_args(BenchInferenceJob, args)


def run(args: argparse.Namespace) -> int:
    return run_bench_inference(job(args))
