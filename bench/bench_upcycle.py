"""Perplexity of the embedded SmolLM2 teacher and of its Mixtral upcycles, and how long upcycling takes.

Dense perplexity on the first `--paragraphs` held-out Wikipedia paragraphs (each paragraph its own sequence,
token-weighted), then for each `--topk`: `megatron-slim upcycle --dense smollm2 --experts E --topk K` (timed, end to
end: load, calibration capture, per-layer split and router fit, save) and the perplexity of the written checkpoint.
At top-k = E the upcycle should match the dense model; below it the gap is what distillation has to recover.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_upcycle.py
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_upcycle.py --experts 8 --topk 8 6 4 --paragraphs 200
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralForCausalLM

from megatron_slim.cli import main as cli_main
from megatron_slim.data.assets import smollm2_hf_dir
from megatron_slim.data.wiki import wiki_splits


def perplexity(model: torch.nn.Module, sequences: list[torch.Tensor]) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in sequences:
            logits = model(ids.unsqueeze(0)).logits[0, :-1].float()
            nll += F.cross_entropy(logits, ids[1:], reduction="sum").item()
            count += ids.numel() - 1
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, nargs="+", default=[8, 6, 4])
    parser.add_argument("--paragraphs", type=int, default=200, help="held-out paragraphs to evaluate on")
    parser.add_argument("--calib-tokens", type=int, default=16384)
    args = parser.parse_args()

    dense_dir = smollm2_hf_dir()
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    sequences = [tokenizer(text, return_tensors="pt").input_ids[0]
                 for text in wiki_splits().heldout[: args.paragraphs]]
    print(f"{args.paragraphs} held-out paragraphs, {sum(s.numel() for s in sequences)} tokens, "
          f"{torch.get_num_threads()} threads")
    dense_ppl = perplexity(AutoModelForCausalLM.from_pretrained(dense_dir).eval(), sequences)
    print(f"dense SmolLM2-135M      ppl {dense_ppl:8.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.topk:
            out = Path(tmp) / f"e{args.experts}k{k}"
            start = time.perf_counter()
            cli_main(["upcycle", "--dense", "smollm2", "--experts", str(args.experts), "--topk", str(k),
                      "--out", str(out), "--calib-tokens", str(args.calib_tokens)])
            seconds = time.perf_counter() - start
            ppl = perplexity(MixtralForCausalLM.from_pretrained(out).eval(), sequences)
            print(f"upcycled E={args.experts} top-{k:<3d}  ppl {ppl:8.2f}  ({ppl / dense_ppl:.2f}x dense)  "
                  f"upcycle {seconds:.0f}s", flush=True)


if __name__ == "__main__":
    main()
