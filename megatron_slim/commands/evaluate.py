"""Evaluate a model on held-out data (LM loss, perplexity, next-token accuracy, MTP speculative acceptance) and on
lm-evaluation-harness tasks.

Windows of --seq-len tokens are cut from --data exactly as for `importance` (data/calibration.py): the first
ceil(--tokens / --seq-len) windows, whatever the layout, so a teacher and its students evaluated on the same data
see identical tokens. MTP acceptance (models with MTP layers) uses the first --mtp-prompts windows cut to
--prompt-len tokens as prompts and the model's own --gen-tokens-token greedy continuation; see
megatron_slim/eval/metrics.py for the exact definition.

--model is a Megatron checkpoint (model_config.json: a converted/pruned model or a training checkpoint's
iter_XXXXXXX directory) or an HF directory, converted first into a temporary Megatron checkpoint next to --out
(or in the working directory) that is removed afterwards. Under torchrun/srun the given ranks are used; as a plain
process it spawns tp*ep*pp local ranks. Prints a small table, or with --json one JSON object with the keys
tokens, loss, ppl, accuracy, mtp_acceptance {k: rate}, mean_accepted, mtp_positions (plus data and layout);
--out writes that object to a file (an existing one only with --overwrite).

--tasks T1,T2 scores lm-eval tasks (its registry, the shipped wiki_cloze, wiki_cloze_gen, wiki_continuation and
wiki_perplexity built from the demo's held-out Wikipedia text, and YAML tasks under --include-path) with the model
at its layout, in place: loglikelihood, rolling loglikelihood and greedy generation (with a generation cache where
it serves, eval/generate.py; otherwise one forward of the prefix per generated token). With --tasks, --data/--tokens
are optional. --json adds "tasks": {TASK: {METRIC: value}}. Data are read as the environment allows
(HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1: local cache and files only); a task whose data cannot be loaded is refused
before the model is loaded. The tokenizer is the checkpoint's.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from megatron_slim.commands.options import add_layout_arguments, add_model_data_arguments
from megatron_slim.engines.evaluate_job import EvaluateJob, run_evaluate
from megatron_slim.runtime.layout import ParallelLayout

HELP = "evaluate LM loss, perplexity, accuracy and MTP acceptance on held-out data, and lm-eval tasks"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_data_arguments(p, "evaluation", "evaluation tokens (rounded up to whole windows of --seq-len)",
                             required=False)
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per evaluation window")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per forward micro-batch")
    add_layout_arguments(p)
    p.add_argument("--mtp-k", type=int, default=4, help="MTP drafts per speculative step (0: no MTP acceptance)")
    p.add_argument("--mtp-prompts", type=int, default=8, help="prompts for MTP acceptance")
    p.add_argument("--prompt-len", type=int, default=256, help="prompt tokens (at most --seq-len)")
    p.add_argument("--gen-tokens", type=int, default=32,
                   help="greedy tokens generated per prompt; must exceed --mtp-k")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model parameter dtype")
    p.add_argument("--tasks", default="", help="comma-separated lm-eval task or group names")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per task (default: the task's)")
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction when < 1)")
    p.add_argument("--include-path", action="append", default=[],
                   help="directory of extra lm-eval YAML tasks (repeatable)")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval requests per forward")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def job(args: argparse.Namespace) -> EvaluateJob:
    """The parsed flags as the library's job."""
    return EvaluateJob(model=args.model, data=args.data, tokens=args.tokens, seq_len=args.seq_len,
                       micro_batch=args.micro_batch, parallel=ParallelLayout(tp=args.tp, ep=args.ep, pp=args.pp),
                       mtp_k=args.mtp_k,
                       mtp_prompts=args.mtp_prompts, prompt_len=args.prompt_len, gen_tokens=args.gen_tokens,
                       dtype=args.dtype, json=args.json, out=Path(args.out) if args.out else None,
                       tasks=tuple(t.strip() for t in args.tasks.split(",")) if args.tasks else (),
                       num_fewshot=args.num_fewshot, limit=args.limit,
                       include_path=tuple(Path(p) for p in args.include_path), batch_size=args.batch_size,
                       overwrite=args.overwrite)


def run(args: argparse.Namespace) -> int:
    return run_evaluate(job(args))
