"""Stands in for the vLLM environment's interpreter running engines/vllm_worker.py (the boundary of
`bench-inference --engine vllm`): started as `fake_python vllm_worker.py` with the request on stdin, it answers by
the worker protocol without vLLM (standard library only, so it starts at once). The greedy tokens it answers are
the ones the test hands it in FAKE_VLLM_GREEDY (JSON, one list per row: what the test computed with transformers);
the timings are fixed lists so the parent's medians and decode definition can be checked exactly.

FAKE_VLLM_MODE picks the answer: agree (default), disagree (row 0's third token changed), error (ok: false),
garbage (no JSON, exit 3). FAKE_VLLM_RECORD names a file that receives {"argv", "env", "request"}.
"""
from __future__ import annotations

import json
import os
import sys

PREFILL_S = [0.5, 0.1, 0.3]
GENERATE_S = [0.9, 0.3, 0.6]  # decode = generate - prefill: 0.4, 0.2, 0.3 -> median 0.3


def main() -> int:
    request = json.loads(sys.stdin.read())
    mode = os.environ.get("FAKE_VLLM_MODE", "agree")
    if os.environ.get("FAKE_VLLM_RECORD"):
        with open(os.environ["FAKE_VLLM_RECORD"], "w") as f:
            json.dump({"argv": sys.argv, "env": dict(os.environ), "request": request}, f)
    print("vLLM-like log line on stderr", file=sys.stderr)
    if mode == "garbage":
        print("not json")
        return 3
    if mode == "error":
        print(json.dumps({"ok": False, "error": "AssertionError: CPU GDN attention requires BF16."}))
        return 1
    rows = json.loads(os.environ["FAKE_VLLM_GREEDY"])
    if mode == "disagree":
        rows[0][2] ^= 1  # another token of the (even-sized) vocabulary
    n = request["repeats"]
    print(json.dumps({"ok": True, "vllm_version": "fake", "peak_memory_bytes": 12345, "prefill_s": PREFILL_S[:n],
                      "generate_s": GENERATE_S[:n], "greedy": rows, "engine_s": 0.0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
