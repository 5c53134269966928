"""Reads stay inside the input: a file a command reads or copies out of a checkpoint directory must resolve inside
that directory, so a symlink (a tokenizer file, a shard) cannot carry a file from elsewhere on the machine into
a checkpoint, an export or an error message without a word.

One layout links outside on purpose and is accepted as a normal checkpoint: a Hugging Face hub-cache snapshot,
`<repo>/snapshots/<revision>/<file>` linking into the same repo's `<repo>/blobs/` (what `huggingface-cli download`
and `from_pretrained` leave, the most common local layout). Any other link leaving the input is refused, naming
it, unless the user asked to follow links (`--follow-symlinks`, which sets FOLLOW_ENV so spawned ranks and child
conversions follow the same policy).
"""
from __future__ import annotations

import os
from pathlib import Path

from megatron_slim.errors import CheckpointError

FOLLOW_ENV = "MEGATRON_SLIM_FOLLOW_SYMLINKS"


def following_symlinks() -> bool:
    """Whether the user asked to follow links that leave the input (`--follow-symlinks`)."""
    return os.environ.get(FOLLOW_ENV) == "1"


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def hub_blobs(root: Path) -> str | None:
    """The `blobs/` directory of the hub-cache repo whose snapshot `root` is, or None if it is not one."""
    real = Path(os.path.realpath(root))
    if real.parent.name != "snapshots":
        return None
    blobs = real.parent.parent / "blobs"
    return os.path.realpath(blobs) if blobs.is_dir() else None


def check_inside(path: Path, root: Path) -> None:
    """Refuse `path` (a file under the input directory `root`) if it resolves outside `root`, except into the
    hub-cache blobs of a snapshot `root`, or when following links was asked for."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    if _within(real, base) or following_symlinks():
        return
    blobs = hub_blobs(root)
    if blobs is not None and _within(real, blobs):
        return
    raise CheckpointError(f"{path} links to {real}, outside the input {root}; refusing to read it "
                          "(--follow-symlinks follows links that leave the input)")
