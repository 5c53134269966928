"""Tokenize a corpus into a Megatron indexed dataset: PREFIX.bin, PREFIX.idx and PREFIX.manifest.json.

Inputs (--input, any number): files, globs ('data/*.parquet', quoted) and directories (their files in sorted
order). The format is read from the content: JSON lines (.jsonl/.json), gzip- or zstandard-compressed JSON lines,
parquet (text column by name), HF datasets.save_to_disk directories; plain text (one document per line) with
--format text. Pre-tokenized data: JSON objects with a list of ids under 'tokens' (or --json-key), and
--tokenizer none --vocab-size V. Every document gets the end-of-document token appended.

--workers N tokenizes in N processes with the tokenizer's batch API; the output is byte-identical for any N.
--shard I/N (or 'auto' in a SLURM array task: launch.sh --submit --array N --cpu-partition P -- preprocess ...
--shard auto) takes the I-th of N contiguous, size-balanced runs of the input files and writes
PREFIX-0000I-of-0000N.*; `megatron-slim merge-datasets` joins the shards in order into exactly the unsharded
dataset. Outputs are written to temporary files and renamed into place, the manifest last: a rerun skips a
dataset whose manifest records the same job and rewrites unfinished shards, so a killed array is resumed by
submitting it again. Bad records fail with file:line (file:row N) unless --skip-bad N allows skipping them.
"""
from __future__ import annotations

import argparse

from megatron_slim.commands.options import add_job_arguments, job_from_args
from megatron_slim.engines.preprocess_job import PreprocessJob
from megatron_slim.runtime.outputs import Output

HELP = "tokenize jsonl/gz/zst/parquet/HF datasets into a Megatron indexed dataset (.bin/.idx + manifest)"


OUTPUTS = (Output("output_prefix", "prefix", inputs=("input", "tokenizer")),)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_job_arguments(p, PreprocessJob)  # each flag's name, default and help: PreprocessJob's fields


def run(args: argparse.Namespace) -> int:
    from megatron_slim.engines.preprocess_job import run_preprocess

    run_preprocess(job_from_args(PreprocessJob, args))
    return 0
