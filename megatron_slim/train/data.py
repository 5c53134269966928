"""Training data: Megatron indexed datasets (.bin/.idx), blended with megatron-core's dataset builders.

Batches are addressed by (step, micro-batch, data-parallel rank) -> sample indices, so the data position is a pure
function of the step: resuming at step k continues exactly where an uninterrupted run would be.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from megatron_slim.errors import UserError


@dataclass(frozen=True)
class TokenizerInfo:
    """What megatron-core's GPTDataset needs to know about the tokenizer."""

    vocab_size: int
    eod: int

    @property
    def unique_identifiers(self) -> dict:  # part of megatron-core's dataset cache key
        return {"class": "TokenizerInfo", "vocab_size": self.vocab_size, "eod": self.eod}


def tokenizer_info(ckpt_dir: str | Path, vocab_size: int) -> TokenizerInfo:
    """EOD id from the checkpoint's tokenizer files (carried by our conversions), else the config's eos id."""
    from megatron_slim.checkpoint.files import Checkpoint
    from megatron_slim.checkpoint.mcore import load_model_config

    cfg = load_model_config(ckpt_dir)
    eos = cfg.hf_config.get("eos_token_id")
    gen = Checkpoint(Path(ckpt_dir), "mcore").tokenizer_files / "generation_config.json"
    if eos is None and gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0]
    return TokenizerInfo(vocab_size=vocab_size, eod=int(eos) if eos is not None else vocab_size - 1)


def build_datasets(blend: list[list], split: str, seq_length: int, num_samples: tuple[int, int, int], seed: int,
                   tok: TokenizerInfo, cache_dir: str, eod_mask_loss: bool):
    """(train, valid, test) GPTDatasets over the weighted blend of indexed-dataset prefixes."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes = [str(p) for _, p in blend]
    for p in prefixes:
        if not (Path(p + ".bin").is_file() and Path(p + ".idx").is_file()):
            raise UserError(f"data prefix {p}: {p}.bin/.idx not found (run `megatron-slim preprocess`)")
    weights = [float(w) for w, _ in blend]
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights if len(prefixes) > 1 else None),
        split=split, tokenizer=tok, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss, create_attention_mask=False, path_to_cache=cache_dir, mmap_bin_files=True,
    )
    _check_splits(prefixes, config.split_matrix, num_samples, split)
    return BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config).build()


def _check_splits(prefixes: list[str], split_matrix: list, num_samples: tuple[int, int, int], split: str) -> None:
    """Refuse a split that must yield samples but holds no tokens of some prefix: megatron-core would loop forever
    counting epochs of an empty split. Document bounds are computed as megatron-core's builder computes them."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for prefix in prefixes:
        dataset = IndexedDataset(prefix, mmap=True)
        lengths = np.array(dataset.sequence_lengths, dtype=np.int64)  # a copy: the view dies with the mmap
        del dataset
        for name, wanted, bounds in zip(("train", "validation", "test"), num_samples, split_matrix, strict=True):
            if not wanted or bounds is None:
                continue
            beg, end = (int(round(b * float(len(lengths)))) for b in bounds)
            if int(lengths[beg:end].sum()) == 0:
                raise UserError(f"data.split {split!r} gives the {name} split {end - beg} of the {len(lengths)} "
                                f"documents of {prefix} and no tokens, but the run needs {wanted} {name} samples: "
                                "add documents or give that split a larger share")


def microbatches(dataset, step: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int
                 ) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches of global step `step`: samples [step*G, (step+1)*G) split across DP ranks."""
    base = step * global_batch
    for m in range(global_batch // (micro_batch * dp_size)):
        start = base + (m * dp_size + dp_rank) * micro_batch
        samples = [dataset[i] for i in range(start, start + micro_batch)]
        yield {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in ("tokens", "labels", "loss_mask")}


def write_indexed_dataset(documents: Iterator[list[int]], prefix: str | Path, vocab_size: int) -> int:
    """Write token documents as a Megatron indexed dataset; returns the number of tokens."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    dtype = np.uint16 if vocab_size <= 65536 else np.int32
    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    total = 0
    for doc in documents:
        if doc:
            builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
            total += len(doc)
    builder.finalize(prefix + ".idx")
    return total
