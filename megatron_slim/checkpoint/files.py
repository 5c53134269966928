"""What every checkpoint reader and writer shares: what a directory holds (`Checkpoint.open`: its format, model
config and tokenizer directory), the files that travel with the weights, staging an output so that only a complete
one ever appears, and the check that a mapping's tensors are all there."""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Literal

from megatron_slim.checkpoint.links import check_inside
from megatron_slim.checkpoint.mcore import MODEL_CONFIG
from megatron_slim.errors import CheckpointError, UserError
from megatron_slim.runtime.outputs import claim_output

if TYPE_CHECKING:
    from megatron_slim.models.config import ModelConfig

HF_CONFIG = "config.json"  # marks an HF checkpoint directory
TOKENIZER_DIR = "tokenizer"  # HF tokenizer/generation files carried inside Megatron checkpoints
_HF_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                  "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


@dataclass(frozen=True)
class Checkpoint:
    """A model directory as every job reads it: "mcore" (a megatron-slim Megatron checkpoint, marked by
    model_config.json, its tokenizer files under tokenizer/) or "hf" (config.json, tokenizer files beside it)."""

    path: Path
    kind: Literal["mcore", "hf"]

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        """`path` by its marker file; anything else is the user's mistake (one line naming it)."""
        path = Path(path)
        if (path / MODEL_CONFIG).is_file():
            return cls(path, "mcore")
        if (path / HF_CONFIG).is_file():
            return cls(path, "hf")
        raise UserError(f"{path} is neither a Megatron checkpoint ({MODEL_CONFIG}) nor an HF checkpoint ({HF_CONFIG})")

    @property
    def tokenizer_files(self) -> Path:
        """Where this checkpoint's tokenizer and generation files are (or would be)."""
        return self.path / TOKENIZER_DIR if self.kind == "mcore" else self.path

    @property
    def tokenizer_dir(self) -> Path | None:
        """The tokenizer directory, or None when the checkpoint carries none."""
        return self.tokenizer_files if self.tokenizer_files.is_dir() else None

    def config(self) -> ModelConfig:
        """The model config, from model_config.json or translated from the HF config by the family's reader."""
        from megatron_slim.checkpoint.mcore import load_model_config
        from megatron_slim.models.config import load_hf_config
        from megatron_slim.models.registry import model_config_from_hf

        if self.kind == "mcore":
            return load_model_config(self.path)
        return model_config_from_hf(load_hf_config(self.path))


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
