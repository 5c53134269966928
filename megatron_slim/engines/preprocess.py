"""Tokenize jsonl (or plain text, one document per line) into a Megatron indexed dataset (.bin/.idx):
`PreprocessJob` and `run_preprocess`, used by the `preprocess` command and by a run's data preparation."""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from megatron_slim.errors import UserError


@dataclass(frozen=True)
class PreprocessJob:
    """The `preprocess` command's flags, by the same names."""

    input: str  # .jsonl (one JSON object per line) or text (one document per line)
    output_prefix: str  # writes PREFIX.bin and PREFIX.idx
    tokenizer: str  # HF tokenizer directory, sentencepiece .model file, or "none" for pre-tokenized ids
    json_key: str = "text"
    vocab_size: int | None = None  # with tokenizer "none"
    eod_id: int | None = None  # overrides the tokenizer's EOS
    no_eod: bool = False


def _documents(job: PreprocessJob) -> Iterator[Any]:
    with open(job.input) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            yield json.loads(line)[job.json_key] if job.input.endswith(".jsonl") else line


def run_preprocess(job: PreprocessJob) -> int:
    """Write the dataset; returns the number of tokens written."""
    from tqdm import tqdm

    from megatron_slim.train.data import write_indexed_dataset

    if job.tokenizer == "none":
        if job.vocab_size is None:
            raise UserError("--tokenizer none needs --vocab-size")
        encode, vocab, eod = (lambda ids: list(ids)), job.vocab_size, job.eod_id
    elif job.tokenizer.endswith(".model"):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=job.tokenizer)
        encode, vocab, eod = sp.encode, sp.get_piece_size(), sp.eos_id()
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(job.tokenizer, local_files_only=True, trust_remote_code=False)
        encode, vocab, eod = (lambda t: tok(t, add_special_tokens=False)["input_ids"]), len(tok), tok.eos_token_id
    eod = job.eod_id if job.eod_id is not None else eod
    if eod is None and not job.no_eod:
        raise UserError("the tokenizer has no EOS token: pass --eod-id or --no-eod")
    docs = (encode(d) + ([] if job.no_eod else [eod]) for d in tqdm(_documents(job), desc="documents"))
    n = write_indexed_dataset(docs, job.output_prefix, vocab)
    print(f"wrote {job.output_prefix}.bin/.idx: {n} tokens")
    return n
