"""The toy language the training tests learn, and the one writer of it: documents of arithmetic progressions mod
120 over the tiny models' 128-token vocabulary, token 127 the end-of-document separator.

`write_toy_jsonl` writes pre-tokenized documents; `preprocess_args` are the `megatron-slim preprocess` arguments that
turn them into an indexed dataset. `support.train_assets.write_toy_data` runs them through the CLI in a subprocess,
`support.run_assets` in its own asset-building process.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from support.tiny_models import VOCAB

EOD_ID = VOCAB - 1


def write_toy_jsonl(path: Path, seed: int, docs: int) -> None:
    """`docs` documents of 20 to 59 tokens as `{"tokens": [...]}` lines; the same seed writes the same file."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(docs):
            start, step = rng.randrange(120), rng.choice([1, 2, 3])
            f.write(json.dumps({"tokens": [(start + step * i) % 120 for i in range(rng.randrange(20, 60))]}) + "\n")


def preprocess_args(root: Path, name: str) -> list[str]:
    """CLI arguments that turn root/<name>.jsonl into the indexed dataset root/<name>.bin/.idx."""
    return ["preprocess", "--input", str(root / f"{name}.jsonl"), "--output-prefix", str(root / name), "--tokenizer",
            "none", "--json-key", "tokens", "--vocab-size", str(VOCAB), "--eod-id", str(EOD_ID)]
