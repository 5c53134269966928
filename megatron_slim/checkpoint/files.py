"""What every checkpoint reader and writer shares: which format a directory holds, the files that travel with the
weights, staging an output so that only a complete one ever appears, and the check that a mapping's tensors are
all there."""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Literal

from megatron_slim.checkpoint.links import check_inside
from megatron_slim.checkpoint.mcore import MODEL_CONFIG
from megatron_slim.errors import CheckpointError, UserError
from megatron_slim.runtime.outputs import claim_output

HF_CONFIG = "config.json"  # marks an HF checkpoint directory
TOKENIZER_DIR = "tokenizer"  # HF tokenizer/generation files carried inside Megatron checkpoints
_HF_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                  "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


def checkpoint_kind(path: str | Path) -> Literal["mcore", "hf"]:
    """Whether `path` is a megatron-slim Megatron checkpoint or an HF one, by its marker file."""
    path = Path(path)
    if (path / MODEL_CONFIG).is_file():
        return "mcore"
    if (path / HF_CONFIG).is_file():
        return "hf"
    raise UserError(f"{path} is neither a Megatron checkpoint ({MODEL_CONFIG}) nor an HF checkpoint ({HF_CONFIG})")


@contextmanager
def staged(out_dir: Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield `<out>.partial`, which becomes `out` only if the body completes: `runtime.outputs.claim_output` (an
    exclusive lock on `out`, `out` overlapping an input refused, only our own outputs overwritten)."""
    with claim_output(out_dir, inputs=inputs, overwrite=overwrite) as tmp:
        yield tmp


def check_keys(kind: str, required: list[str], present: set[str], where: str) -> None:
    """Every tensor the mapping needs is in the checkpoint (one error listing the first missing ones)."""
    missing = [k for k in required if k not in present]
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} {kind} tensors required by the mapping are missing: "
                              f"{missing[:10]}")


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer and generation files travel with the weights, as regular files; each must resolve inside `src`
    (or its hub-cache blobs: `checkpoint.links`), so a link elsewhere is refused before anything is copied."""
    present = [name for name in _HF_SIDE_FILES if (src / name).is_file()]
    for name in present:
        check_inside(src / name, src)
    for name in present:
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / name, dst / name)
