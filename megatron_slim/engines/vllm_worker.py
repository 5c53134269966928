"""The vLLM side of `bench-inference`, run as a script by the vLLM environment's interpreter (`make vllm-env`).

vLLM pins its own torch, transformers and Python, so it lives in a separate environment and this file imports
nothing from megatron_slim (nor anything beyond the standard library and vLLM): the parent
(engines/vllm_engine.py) starts `VLLM_PYTHON vllm_worker.py`, writes one JSON request on its stdin and reads one
JSON object from its stdout. Everything vLLM prints goes to stderr (the stdout file descriptor is pointed at
stderr while vLLM runs), so the reply is the only thing on stdout.

Request: {"model", "dtype", "prompts" (token ids, one list per row), "gen_len", "warmup", "repeats"}.
Reply: {"ok": true, "vllm_version", "peak_memory_bytes", "prefill_s": [...], "generate_s": [...],
"greedy": [[token ids] per row], "engine_s"} or {"ok": false, "error": "..."}.

Per round: `prefill_s` times a generate of one token per prompt (one forward over the prompts, as the
transformers side's prefill), `generate_s` a generate of 1 + gen_len tokens; the parent takes
decode time = generate - prefill per round, so both engines' figures have the same definitions. Sampling is
greedy with end-of-sequence ignored, so every round decodes exactly gen_len tokens and `greedy` is comparable with
transformers' argmax continuation token for token.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(request: dict) -> dict:
    """One model's timings in vLLM: a warm engine (start-up is timed separately, never in the figures)."""
    import torch
    from vllm import LLM, SamplingParams

    prompts = [{"prompt_token_ids": list(row)} for row in request["prompts"]]
    prompt_len = max(len(row) for row in request["prompts"])
    gen_len = int(request["gen_len"])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # the resident high-water mark restarts here
            f.write("5")
        base = _status_bytes("VmRSS")
    start = time.perf_counter()
    llm = LLM(model=request["model"], dtype=request["dtype"], enforce_eager=True, enable_prefix_caching=False,
              max_num_seqs=len(prompts), max_model_len=prompt_len + gen_len + 1, skip_tokenizer_init=True,
              seed=0)
    engine_s = time.perf_counter() - start
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
    full = SamplingParams(temperature=0.0, max_tokens=gen_len + 1, ignore_eos=True, detokenize=False)
    prefill_s, generate_s, greedy = [], [], []
    for round_ in range(int(request["warmup"]) + int(request["repeats"])):
        t0 = time.perf_counter()
        llm.generate(prompts, first, use_tqdm=False)
        t1 = time.perf_counter()
        outputs = llm.generate(prompts, full, use_tqdm=False)
        t2 = time.perf_counter()
        greedy = [list(o.outputs[0].token_ids) for o in outputs]
        if round_ >= int(request["warmup"]):
            prefill_s.append(t1 - t0)
            generate_s.append(t2 - t1)
    peak = torch.cuda.max_memory_allocated() - base if cuda else _status_bytes("VmHWM") - base
    import vllm

    return {"ok": True, "vllm_version": vllm.__version__, "peak_memory_bytes": int(peak), "prefill_s": prefill_s,
            "generate_s": generate_s, "greedy": greedy, "engine_s": engine_s}


def main() -> int:
    reply_fd = os.dup(1)
    os.dup2(2, 1)  # vLLM's and torch's own prints (Python or C level) land on stderr
    sys.stdout = sys.stderr
    try:
        reply = measure(json.loads(sys.stdin.read()))
    except BaseException as e:  # noqa: BLE001 - every failure is reported to the parent as one JSON reply
        traceback.print_exc()
        reply = {"ok": False, "error": f"{type(e).__name__}: {e}".strip()[:2000]}
    with os.fdopen(reply_fd, "w") as out:
        out.write(json.dumps(reply) + "\n")
    return 0 if reply["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
