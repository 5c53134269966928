"""Turn jsonl (or plain text, one document per line) into a Megatron indexed dataset (.bin/.idx).

Tokenizes with an HF tokenizer directory or a sentencepiece model and appends the end-of-document token to every
document. Pre-tokenized input works too: jsonl lines with a list of ids under --json-key and --tokenizer none.
"""
from __future__ import annotations

import argparse

from megatron_slim.runtime.outputs import Output

HELP = "jsonl/text -> Megatron indexed dataset (.bin/.idx) with an HF or sentencepiece tokenizer"


OUTPUTS = (Output("output_prefix", "prefix", inputs=("input", "tokenizer")),)

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="jsonl file (one JSON object per line) or .txt (one doc per line)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--tokenizer", required=True,
                   help="HF tokenizer directory, a sentencepiece .model file, or 'none' for pre-tokenized ids")
    p.add_argument("--json-key", default="text", help="field holding the text (or the ids with --tokenizer none)")
    p.add_argument("--vocab-size", type=int, default=None, help="with --tokenizer none: the vocabulary size")
    p.add_argument("--eod-id", type=int, default=None,
                   help="override the end-of-document id (default: tokenizer's EOS)")
    p.add_argument("--no-eod", action="store_true", help="do not append the end-of-document token")


def run(args: argparse.Namespace) -> int:
    from megatron_slim.engines.preprocess import PreprocessJob, run_preprocess

    run_preprocess(PreprocessJob(input=args.input, output_prefix=args.output_prefix, tokenizer=args.tokenizer,
                                 json_key=args.json_key, vocab_size=args.vocab_size, eod_id=args.eod_id,
                                 no_eod=args.no_eod))
    return 0
