"""Calibration tokens: fixed windows of `seq_len` tokens from a corpus, the same on every rank and every run.

Sources, chosen by the path:
- `*.jsonl` / `*.json` lines with {"text": ...} (tokenized with the checkpoint's HF tokenizer) or {"tokens": [ids]}
  (for tokenizer-less models and pre-tokenized data);
- a Megatron indexed dataset: the `.bin`/`.idx` prefix (or either file), one document per index document.
Documents are concatenated in file order, each followed by EOS unless it already ends with it, and the stream is
cut into consecutive non-overlapping windows; a trailing partial window is dropped. Nothing is shuffled, so a run
is reproducible from (path, seq_len, number of windows).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_slim.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".json")


def indexed_prefix(path: str | Path) -> str | None:
    """The Megatron indexed-dataset prefix named by `path` (prefix, .bin or .idx), or None if it is not one."""
    p = str(path)
    prefix = p[:-4] if p.endswith((".bin", ".idx")) else p
    return prefix if Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file() else None


def check_source(path: str | Path) -> None:
    """Fail early (before any model work) when `path` is neither a jsonl file nor an indexed dataset."""
    p = Path(path)
    if p.suffix in JSONL_SUFFIXES:
        if not p.is_file():
            raise FileNotFoundError(f"calibration data {p} does not exist")
    elif indexed_prefix(p) is None:
        raise UserError(f"calibration data {p}: expected a .jsonl file or a Megatron indexed dataset prefix "
                        "(with .bin and .idx files)")


def eos_token_id(hf_config: dict[str, Any], tokenizer_dir: str | Path | None) -> int:
    """The document separator: the model config's `eos_token_id` (first one if a list), else the tokenizer's."""
    eos = hf_config.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if eos is None and tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
        eos = load_tokenizer(tokenizer_dir).eos_token_id
    if eos is None:
        raise UserError("cannot tell the EOS token: the model config has no eos_token_id and no tokenizer defines one")
    return int(eos)


def load_tokenizer(tokenizer_dir: str | Path):
    from transformers import AutoTokenizer

    if not Path(tokenizer_dir).is_dir():  # transformers would take the path for a hub repo id and say that is bad
        raise UserError(f"tokenizer directory {tokenizer_dir} does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UserError(f"no usable HF tokenizer in {tokenizer_dir}: {e}") from e


def token_ids(value: Any, where: str, vocab_size: int | None) -> np.ndarray:
    """A pre-tokenized document's ids: integers in [0, vocab_size), else an error naming where they came from."""
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise UserError(f"{where}: 'tokens' must be a list of integer token ids")
    try:
        ids = np.asarray(value, dtype=np.int64)
    except OverflowError:  # JSON integers are unbounded
        raise UserError(f"{where}: token id {max(value, key=abs)} is outside the model's vocabulary (not even a "
                        "64-bit integer)") from None
    return check_range(ids, where, vocab_size)


def encoded_text(ids: list[int], text: str, where: str) -> list[int]:
    """A tokenizer's output for `text`, refused when text with any content comes out as no token at all: what a
    checkpoint without tokenizer files gives (transformers then builds an empty tokenizer), which would otherwise
    turn a corpus into a stream of end-of-document tokens."""
    if not ids and text.strip():
        raise UserError(f"{where}: the text tokenizes to no token at all; is the tokenizer complete? (a checkpoint "
                        "directory without tokenizer files yields an empty tokenizer)")
    return ids


def check_range(ids: np.ndarray, where: str, vocab_size: int | None) -> np.ndarray:
    """`ids` when they lie in [0, vocab_size) (vocab_size None: only >= 0), else an error naming `where`."""
    if ids.size and ids.min() < 0:
        raise UserError(f"{where}: negative token id {int(ids.min())}")
    if vocab_size is not None and ids.size and ids.max() >= vocab_size:
        raise UserError(f"{where}: token id {int(ids.max())} is outside the model's vocabulary of {vocab_size}")
    return ids


def _jsonl_documents(path: Path, tokenizer_dir: str | Path | None, vocab_size: int | None) -> Iterator[np.ndarray]:
    tokenizer = None
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                "JSON lines must be UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{where}: expected a JSON object with 'text' or 'tokens'")
            if "tokens" in obj:
                yield token_ids(obj["tokens"], where, vocab_size)
            elif "text" in obj:
                if not isinstance(obj["text"], str):
                    raise UserError(f"{where}: 'text' must be a string")
                if tokenizer is None:
                    if tokenizer_dir is None:
                        raise UserError(f"{path}: text data needs a tokenizer, and the checkpoint has none")
                    tokenizer = load_tokenizer(tokenizer_dir)
                ids = encoded_text(tokenizer(obj["text"])["input_ids"], obj["text"], where)
                yield check_range(np.asarray(ids, dtype=np.int64), where, vocab_size)
            else:
                raise UserError(f"{where}: expected a JSON object with 'text' or 'tokens'")


def _indexed_documents(prefix: str, vocab_size: int | None) -> Iterator[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    bounds = ds.document_indices
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        ids = np.concatenate([np.asarray(s, dtype=np.int64) for s in ds[int(start):int(end)]])
        yield check_range(ids, f"{prefix} (document {i})", vocab_size)


def documents(path: str | Path, tokenizer_dir: str | Path | None = None,
              vocab_size: int | None = None) -> Iterator[np.ndarray]:
    """Token ids of each document, in file order; with `vocab_size`, ids outside the vocabulary are an error."""
    check_source(path)
    p = Path(path)
    if p.suffix in JSONL_SUFFIXES:
        return _jsonl_documents(p, tokenizer_dir, vocab_size)
    return _indexed_documents(indexed_prefix(p), vocab_size)


def check_sample(path: str | Path, tokenizer_dir: str | Path | None, vocab_size: int, docs: int = 64) -> None:
    """The checks reading `path` makes, on its first `docs` documents: for validating a recipe before any compute
    (a bad line, text without a tokenizer, or an id outside the vocabulary fails there, not an hour later)."""
    for i, _ in enumerate(documents(path, tokenizer_dir, vocab_size)):
        if i + 1 >= docs:
            break


def calibration_windows(path: str | Path, seq_len: int, num_windows: int, eos_id: int,
                        tokenizer_dir: str | Path | None = None, vocab_size: int | None = None) -> torch.Tensor:
    """The first `num_windows` windows [n, seq_len] of the EOS-joined document stream (fewer if the data ends).
    With `vocab_size`, every id read must lie in [0, vocab_size): past the embedding, an id is an IndexError deep
    inside the model at TP=1 and a silent all-zero embedding under vocab-parallel TP."""
    if seq_len < 2 or num_windows < 1:
        raise ValueError(f"need seq_len >= 2 and num_windows >= 1, got {seq_len} and {num_windows}")
    need = seq_len * num_windows
    pieces: list[np.ndarray] = []
    have = 0
    for doc in documents(path, tokenizer_dir, vocab_size):
        if len(doc) == 0 or doc[-1] != eos_id:
            doc = np.append(doc, eos_id)
        pieces.append(doc)
        have += len(doc)
        if have >= need:
            break
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    n = min(num_windows, len(stream) // seq_len)
    return torch.from_numpy(stream[:n * seq_len].copy()).view(n, seq_len)
