"""Concatenate Megatron indexed datasets (e.g. the shards of `preprocess --shard`) into one, in the given order.

Uses megatron-core's IndexedDatasetBuilder.add_index. The merged manifest sums the inputs' documents, tokens and
skipped records (checked against the datasets themselves) and keeps one entry per input shard. Inputs tokenized
with different tokenizers or token dtypes are refused. Shards can also be used directly in a blend
(`megatron-slim blend`) without merging.
"""
from __future__ import annotations

import argparse

from megatron_slim.runtime.outputs import Output

HELP = "concatenate indexed datasets (preprocess shards) into one .bin/.idx + manifest"


OUTPUTS = (Output("output_prefix", "prefix", inputs=("inputs",)),)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inputs", required=True, nargs="+", metavar="PREFIX", help="dataset prefixes, in output order")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.manifest.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing merged dataset")


def run(args: argparse.Namespace) -> int:
    from megatron_slim.engines.preprocess_job import merge_datasets

    merge_datasets(list(args.inputs), args.output_prefix, overwrite=args.overwrite)
    return 0
