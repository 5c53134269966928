"""`PREFIX.manifest.json`: what a tokenized dataset (`PREFIX.bin/.idx`) was made from and what it holds.

Written last by `preprocess` and `merge-datasets` (after the .bin and .idx are in place), so its presence means the
dataset is complete. It records the inputs (paths, sizes, SHA-256 of their first and last MiB: cheap at corpus
scale, and enough to notice a replaced or re-exported file), the tokenizer's fingerprint, the job's options, the
counts (documents, tokens, skipped records) and, for sharded or merged data, one entry per shard. A rerun of the
same job compares the `job` section to decide that a dataset is already done.

`read_manifest` is the reader for everyone else (the blend, a run's corpus checks); `blend_weights` turns manifests
into a recipe's `data.train` list.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_slim.errors import UserError

SUFFIX = ".manifest.json"
FORMAT = "megatron-slim-dataset-manifest"
VERSION = 1
MIB = 1 << 20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model")


def manifest_path(prefix: str | Path) -> Path:
    return Path(str(prefix) + SUFFIX)


def file_fingerprint(path: Path, files: list[Path] | None = None) -> dict[str, Any]:
    """Path, size and hashes of the first and last MiB of `path` (or of each of `files`, for a directory input)."""
    parts = files if files is not None else [path]
    head, tail, size = hashlib.sha256(), hashlib.sha256(), 0
    for part in parts:
        with part.open("rb") as f:
            n = f.seek(0, 2)
            f.seek(0)
            head.update(f.read(MIB))
            f.seek(max(n - MIB, 0))
            tail.update(f.read(MIB))
        size += n
    return {"path": str(path.resolve()), "size": size, "head_sha256": head.hexdigest(),
            "tail_sha256": tail.hexdigest()}


def tokenizer_fingerprint(tokenizer: str) -> str:
    """SHA-256 over the tokenizer's own files (a checkpoint directory's weights are not part of it), or of the
    sentencepiece model; "none" for pre-tokenized data."""
    if tokenizer == "none":
        return "none"
    path = Path(tokenizer)
    files = [path] if path.is_file() else [path / n for n in TOKENIZER_FILES if (path / n).is_file()]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()


@dataclass(frozen=True)
class DatasetManifest:
    """A manifest as read back: the counts every consumer needs, and the full record in `data`."""

    path: Path
    prefix: str  # the dataset's .bin/.idx prefix (absolute)
    documents: int
    tokens: int
    skipped: int
    tokenizer: str  # fingerprint
    data: dict[str, Any]

    @property
    def shards(self) -> list[dict[str, Any]]:
        return list(self.data.get("shards", []))


def read_manifest(path_or_prefix: str | Path) -> DatasetManifest:
    """The manifest at `path_or_prefix` (the .manifest.json file or its dataset prefix); a UserError naming the file
    if it is missing or not one of ours."""
    given = str(path_or_prefix)
    path = Path(given) if given.endswith(SUFFIX) else manifest_path(given)
    if not path.is_file():
        raise UserError(f"{path}: no dataset manifest (written by `megatron-slim preprocess` or `merge-datasets` "
                        "once a dataset is complete)")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
        prefix = str((path.parent / data["prefix"]).resolve()) if not Path(data["prefix"]).is_absolute() \
            else data["prefix"]
        return DatasetManifest(path=path, prefix=prefix, documents=int(data["documents"]),
                               tokens=int(data["tokens"]), skipped=int(data["skipped"]),
                               tokenizer=str(data["tokenizer"]["fingerprint"]), data=data)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: not a megatron-slim dataset manifest ({e})") from None


def blend_weights(manifests: list[DatasetManifest], weights: str) -> list[list]:
    """[[weight, prefix], ...] for a recipe's `data.train`: `tokens` (proportional to each dataset's tokens, i.e.
    every token seen equally often), `uniform`, or explicit comma-separated weights; normalized to sum to 1."""
    if not manifests:
        raise UserError("blend: give at least one --manifest")
    if weights == "tokens":
        raw = [float(m.tokens) for m in manifests]
    elif weights == "uniform":
        raw = [1.0] * len(manifests)
    else:
        try:
            raw = [float(w) for w in weights.split(",")]
        except ValueError:
            raise UserError(f"--weights {weights!r}: expected tokens, uniform or numbers like 0.7,0.3") from None
        if len(raw) != len(manifests):
            raise UserError(f"--weights gives {len(raw)} weights for {len(manifests)} manifests")
        if any(w < 0 for w in raw):
            raise UserError(f"--weights {weights!r}: weights must not be negative")
    fingerprints = {m.tokenizer for m in manifests}
    if len(fingerprints) > 1:
        raise UserError("blend: the manifests' datasets were tokenized with different tokenizers: "
                        + ", ".join(f"{m.path} ({m.tokenizer[:12]})" for m in manifests))
    total = sum(raw)
    if total <= 0:
        raise UserError("blend: the weights sum to zero (datasets without tokens?)")
    return [[round(w / total, 6), m.prefix] for w, m in zip(raw, manifests)]
