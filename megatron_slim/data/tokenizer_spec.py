"""An HF tokenizer directory reduced to what tokenization needs: the Rust tokenizer's JSON as transformers builds it
(`backend_tokenizer.to_str()`), the vocabulary size (`len(tokenizer)`) and the EOS id. Cached per tokenizer files
and library versions.

Why a cache: transformers' AutoTokenizer imports torch and transformers (~5 CPU-s, far more from a network
filesystem) only to learn what a few small files say, serial start-up of every `preprocess` process, before its
workers can run; a SLURM array of shard tasks pays it once per task. The key covers every file AutoTokenizer reads
for a local tokenizer (`TOKENIZER_FILES`, config.json) byte for byte, and the versions of transformers and
tokenizers, so a changed file or an upgrade builds the spec again. An unwritable cache only costs the load.
"""
from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import version
from pathlib import Path

from megatron_slim.data.assets import cache_dir
from megatron_slim.data.manifest import TOKENIZER_FILES

SPEC_VERSION = 1  # of the cached record: bump when what `hf_tokenizer_spec` returns changes meaning


def spec_key(tokenizer_dir: Path) -> str:
    """SHA-256 over the directory's tokenizer files (names and bytes) and the library versions."""
    digest = hashlib.sha256(f"{SPEC_VERSION}\0{version('transformers')}\0{version('tokenizers')}\0".encode())
    for name in (*TOKENIZER_FILES, "config.json"):
        path = tokenizer_dir / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def spec_path(tokenizer_dir: Path) -> Path:
    return cache_dir() / "tokenizer-specs" / f"{spec_key(tokenizer_dir)}.json"


def hf_tokenizer_spec(tokenizer_dir: str | Path) -> tuple[str, int, int | None]:
    """(backend tokenizer JSON, vocabulary size, EOS id or None) of an HF tokenizer directory."""
    tokenizer_dir = Path(tokenizer_dir)
    cached = spec_path(tokenizer_dir) if tokenizer_dir.is_dir() else None
    if cached is not None:
        try:
            record = json.loads(cached.read_text())
            return record["backend"], record["vocab"], record["eos"]
        except (OSError, ValueError, KeyError, TypeError):  # absent or unreadable: built below
            pass
    from megatron_slim.data.calibration import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    spec = (tok.backend_tokenizer.to_str(), len(tok), tok.eos_token_id)
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"backend": spec[0], "vocab": spec[1], "eos": spec[2],
                                       "tokenizer": str(tokenizer_dir.resolve())}))
            os.replace(tmp, cached)  # concurrent tasks write the same record; readers never see half of one
        except OSError:
            pass
    return spec
