"""Deployment efficiency of the demo's teacher and final student (the paper's efficiency table, at demo scale):
peak memory, prefill latency and decode tokens/s with transformers (and vLLM with --engine vllm), and the
student/teacher ratios.

Models: `--model DIR` (repeatable, the first is the baseline), else the demo's cached teacher
(`~/.cache/megatron-slim/demo/teacher`, built by `make demo`) and its exported student (`runs/demo/export/hf`).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_inference.py
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_inference.py --engine transformers --engine vllm
    .venv/bin/python bench/bench_inference.py --device cuda --dtype bfloat16 --batch 8 --prompt-len 2048
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_slim.data.assets import cache_dir
from megatron_slim.engines.bench_inference_job import DTYPES, ENGINES, BenchInferenceJob, bench_models, format_table

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[])
    parser.add_argument("--workdir", default=str(REPO / "runs" / "demo"), help="the demo run's work dir")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engine", action="append", choices=ENGINES, default=None,
                        help="transformers (default) and/or vllm (the vLLM environment: `make vllm-env`)")
    parser.add_argument("--vllm-python", default=None, help="the vLLM environment's interpreter")
    a = parser.parse_args()
    models = a.model or [str(cache_dir() / "demo" / "teacher"), str(Path(a.workdir) / "export" / "hf")]
    missing = [m for m in models if not (Path(m) / "config.json").is_file()]
    if missing:
        print(f"missing HF checkpoints: {', '.join(missing)} (run `make demo` first, or pass --model)",
              file=sys.stderr)
        return 1
    job = BenchInferenceJob(models=tuple(models), batch=a.batch, prompt_len=a.prompt_len, gen_len=a.gen_len,
                            dtype=a.dtype, device=a.device, repeats=a.repeats,
                            engines=tuple(a.engine or ("transformers",)), vllm_python=a.vllm_python)
    print(format_table(bench_models(job), job))
    return 0


if __name__ == "__main__":
    sys.exit(main())
