"""Tokenize jsonl (or plain text, one document per line) into a Megatron indexed dataset (.bin/.idx):
`PreprocessJob` and `run_preprocess`, used by the `preprocess` command and by a run's data preparation."""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from megatron_slim.errors import UserError


@dataclass(frozen=True)
class PreprocessJob:
    """The `preprocess` command's flags, by the same names."""

    input: str  # .jsonl (one JSON object per line) or text (one document per line)
    output_prefix: str  # writes PREFIX.bin and PREFIX.idx
    tokenizer: str  # HF tokenizer directory, sentencepiece .model file, or "none" for pre-tokenized ids
    json_key: str = "text"
    vocab_size: int | None = None  # the model's: ids must lie below it (needed with tokenizer "none")
    eod_id: int | None = None  # overrides the tokenizer's EOS
    no_eod: bool = False


def _documents(job: PreprocessJob) -> Iterator[tuple[str, str | list]]:
    """(file:line, the document): its text, or its token ids where a jsonl line carries pre-tokenized `tokens`
    (or `--json-key` names a list), so text and pre-tokenized data go through the same command and runs."""
    jsonl = job.input.endswith(".jsonl")
    with open(job.input, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            where = f"{job.input}:{lineno}"
            if not jsonl:
                yield where, line
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            key = job.json_key if isinstance(obj, dict) and job.json_key in obj else "tokens"
            if not isinstance(obj, dict) or key not in obj:
                raise UserError(f"{where}: expected a JSON object with {job.json_key!r} (text) or 'tokens' (ids)")
            yield where, obj[key]


def run_preprocess(job: PreprocessJob) -> int:
    """Write the dataset; returns the number of tokens written."""
    import numpy as np
    from tqdm import tqdm

    from megatron_slim.data.calibration import check_range, encoded_text, load_tokenizer, token_ids
    from megatron_slim.train.data import write_indexed_dataset

    if job.tokenizer == "none":
        if job.vocab_size is None:
            raise UserError("--tokenizer none needs --vocab-size")
        encode, vocab, eod = None, job.vocab_size, job.eod_id
    elif job.tokenizer.endswith(".model"):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=job.tokenizer)
        encode, vocab, eod = sp.encode, sp.get_piece_size(), sp.eos_id()
    else:
        tok = load_tokenizer(job.tokenizer)
        encode, vocab, eod = (lambda t: tok(t, add_special_tokens=False)["input_ids"]), len(tok), tok.eos_token_id
    eod = job.eod_id if job.eod_id is not None else eod
    if eod is None and not job.no_eod:
        raise UserError("the tokenizer has no EOS token: pass --eod-id or --no-eod")
    vocab = job.vocab_size or vocab  # the model's vocabulary bounds the ids (its embedding may have padding rows)

    def ids(where: str, doc: str | list) -> list[int]:
        if isinstance(doc, list):
            return token_ids(doc, where, vocab).tolist()
        if job.tokenizer == "none":
            raise UserError(f"{where}: text needs a tokenizer (--tokenizer none reads token ids only)")
        return check_range(np.asarray(encoded_text(encode(doc), doc, where), dtype=np.int64), where, vocab).tolist()

    eos = [] if job.no_eod else [eod]
    docs = (ids(where, doc) + eos for where, doc in tqdm(_documents(job), desc="documents"))
    n = write_indexed_dataset(docs, job.output_prefix, vocab)
    print(f"wrote {job.output_prefix}.bin/.idx: {n} tokens")
    return n
