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

from megatron_slim.data.corpus import FORMATS
from megatron_slim.runtime.outputs import Output

HELP = "tokenize jsonl/gz/zst/parquet/HF datasets into a Megatron indexed dataset (.bin/.idx + manifest)"


OUTPUTS = (Output("output_prefix", "prefix", inputs=("input", "tokenizer")),)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, action="append", metavar="PATH",
                   help="file, glob or directory; repeat for more (read in the order given)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.manifest.json")
    p.add_argument("--tokenizer", required=True,
                   help="HF tokenizer directory, a sentencepiece .model file, or 'none' for pre-tokenized ids")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="input format; auto reads it from the content (text must be asked for, or named .txt)")
    p.add_argument("--json-key", default="text",
                   help="JSON field holding the text (or the ids, with --tokenizer none)")
    p.add_argument("--column", default=None,
                   help="parquet / HF dataset column holding the text (None: the --json-key value)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="the model's vocabulary size (ids must lie below it); required with --tokenizer none")
    p.add_argument("--eod-id", type=int, default=None, help="end-of-document id (None: the tokenizer's EOS)")
    p.add_argument("--no-eod", action="store_true", help="do not append the end-of-document token")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (one core each)")
    p.add_argument("--batch-size", type=int, default=512, help="documents per tokenizer call / per unit of work")
    p.add_argument("--shard", default=None, metavar="I/N|auto",
                   help="write only shard I of N of the input files (auto: from the SLURM array task)")
    p.add_argument("--skip-bad", type=int, default=0, metavar="N",
                   help="skip (and count) up to N bad records instead of failing on the first")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset at the prefix (one recording the same job is skipped otherwise)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from megatron_slim.engines.preprocess_job import PreprocessJob, run_preprocess

    run_preprocess(PreprocessJob(inputs=tuple(args.input), output_prefix=args.output_prefix, tokenizer=args.tokenizer,
                                 json_key=args.json_key, column=args.column, format=args.format,
                                 vocab_size=args.vocab_size, eod_id=args.eod_id, no_eod=args.no_eod,
                                 workers=args.workers, batch_size=args.batch_size, shard=args.shard,
                                 skip_bad=args.skip_bad, overwrite=args.overwrite, progress=not args.no_progress))
    return 0
