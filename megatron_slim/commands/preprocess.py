"""Turn jsonl (or plain text, one document per line) into a Megatron indexed dataset (.bin/.idx).

Tokenizes with an HF tokenizer directory or a sentencepiece model and appends the end-of-document token to every
document. Pre-tokenized input works too: jsonl lines with a list of ids under --json-key and --tokenizer none.
"""
from __future__ import annotations

import argparse
import json

HELP = "jsonl/text -> Megatron indexed dataset (.bin/.idx) with an HF or sentencepiece tokenizer"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="jsonl file (one JSON object per line) or .txt (one doc per line)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--tokenizer", required=True,
                   help="HF tokenizer directory, a sentencepiece .model file, or 'none' for pre-tokenized ids")
    p.add_argument("--json-key", default="text", help="field holding the text (or the ids with --tokenizer none)")
    p.add_argument("--vocab-size", type=int, default=None, help="with --tokenizer none: the vocabulary size")
    p.add_argument("--eod-id", type=int, default=None, help="override the end-of-document id (default: tokenizer's EOS)")
    p.add_argument("--no-eod", action="store_true", help="do not append the end-of-document token")


def _documents(args: argparse.Namespace):
    with open(args.input) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            yield json.loads(line)[args.json_key] if args.input.endswith(".jsonl") else line


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from megatron_slim.errors import UserError
    from megatron_slim.train.data import write_indexed_dataset

    if args.tokenizer == "none":
        if args.vocab_size is None:
            raise UserError("--tokenizer none needs --vocab-size")
        encode, vocab, eod = (lambda ids: list(ids)), args.vocab_size, args.eod_id
    elif args.tokenizer.endswith(".model"):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=args.tokenizer)
        encode, vocab, eod = sp.encode, sp.get_piece_size(), sp.eos_id()
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True, trust_remote_code=False)
        encode, vocab, eod = (lambda t: tok(t, add_special_tokens=False)["input_ids"]), len(tok), tok.eos_token_id
    eod = args.eod_id if args.eod_id is not None else eod
    if eod is None and not args.no_eod:
        raise UserError("the tokenizer has no EOS token: pass --eod-id or --no-eod")
    docs = (encode(d) + ([] if args.no_eod else [eod]) for d in tqdm(_documents(args), desc="documents"))
    n = write_indexed_dataset(docs, args.output_prefix, vocab)
    print(f"wrote {args.output_prefix}.bin/.idx: {n} tokens")
    return 0
