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

from megatron_slim.commands.options import add_job_arguments, job_from_args
from megatron_slim.engines.evaluate_job import EvaluateJob, run_evaluate
from megatron_slim.runtime.outputs import Output

HELP = "evaluate LM loss, perplexity, accuracy and MTP acceptance on held-out data, and lm-eval tasks"


OUTPUTS = (Output("out", "file", inputs=("model", "data", "include_path")),)

def add_arguments(p: argparse.ArgumentParser) -> None:
    add_job_arguments(p, EvaluateJob)  # each flag's name, default and help: EvaluateJob's fields


def job(args: argparse.Namespace) -> EvaluateJob:
    """The parsed flags as the library's job."""
    return job_from_args(EvaluateJob, args)


def run(args: argparse.Namespace) -> int:
    return run_evaluate(job(args))
