"""Training data: Megatron indexed datasets (.bin/.idx), blended with megatron-core's dataset builders.

Batches are addressed by (offset, step, micro-batch, data-parallel rank) -> sample indices, so the data position is a
pure function of the step: resuming at step k continues exactly where an uninterrupted run would be. `offset` is
where the run starts in its data stream: a recipe's stages build the same stream (data.stream_samples, data.seed)
and each starts where the previous one stopped, so no sample repeats until the corpus is exhausted.
"""
from __future__ import annotations

import json
import math
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


@dataclass(frozen=True)
class DatasetUsage:
    """How much of one dataset of the blend a run reads: tokens of its train split, tokens the run draws from it."""

    prefix: str
    weight: float  # normalised blend weight
    available: int  # tokens in the dataset's train split
    requested: int  # tokens the whole data stream draws from it

    @property
    def epochs(self) -> float:
        return self.requested / self.available if self.available else math.inf


def _split_bounds(split: str) -> list:
    """megatron-core's split matrix for a split string (its builder's own parsing)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    return convert_split_vector_to_split_matrix(parse_and_normalize_split(split))


def _document_tokens(prefix: str) -> np.ndarray:
    """Tokens per document, read from the .idx alone (no token data is touched)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if not (Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file()):
        raise UserError(f"data prefix {prefix}: {prefix}.bin/.idx not found (run `megatron-slim preprocess`)")
    dataset = IndexedDataset(prefix, mmap=True)
    lengths = np.array(dataset.sequence_lengths, dtype=np.int64)  # a copy: the view dies with the mmap
    del dataset
    return lengths


def corpus_usage(blend: list[list], split: str, seq_length: int, num_samples: tuple[int, int, int]
                 ) -> list[DatasetUsage]:
    """Per dataset of the blend, its train-split tokens and the tokens `num_samples[0]` training samples draw
    from it (each sample advances the stream by seq_length tokens; weights as megatron-core normalises them).
    Refuses a split that must yield samples but holds no tokens of some prefix (megatron-core would loop forever
    counting epochs of an empty split). Document bounds are computed as megatron-core's builder computes them."""
    matrix = _split_bounds(split)
    total_weight = sum(float(w) for w, _ in blend)
    usages = []
    for weight, prefix in blend:
        prefix = str(prefix)
        lengths = _document_tokens(prefix)
        tokens = []
        for name, wanted, bounds in zip(("train", "validation", "test"), num_samples, matrix, strict=True):
            beg, end = (int(round(b * float(len(lengths)))) for b in bounds) if bounds is not None else (0, 0)
            tokens.append(int(lengths[beg:end].sum()))
            if wanted and tokens[-1] == 0:
                raise UserError(f"data.split {split!r} gives the {name} split {end - beg} of the {len(lengths)} "
                                f"documents of {prefix} and no tokens, but the run needs {wanted} {name} samples: "
                                "add documents or give that split a larger share")
        share = float(weight) / total_weight
        usages.append(DatasetUsage(prefix, share, tokens[0], math.ceil(share * num_samples[0] * seq_length)))
    return usages


def check_corpus(usages: list[DatasetUsage], max_epochs: float) -> None:
    """Refuse a stream that reads some dataset more than `max_epochs` times (data.max_epochs)."""
    over = [u for u in usages if u.epochs > max_epochs]
    if over:
        u = over[0]
        raise UserError(f"data: the run requests {u.requested:,} tokens of {u.prefix} (blend weight {u.weight:.3g}) "
                        f"but its train split holds {u.available:,}: {u.epochs:.2f} epochs > data.max_epochs "
                        f"{max_epochs:g}; add data, train fewer tokens, or raise data.max_epochs to repeat it "
                        "knowingly")


def usage_lines(usages: list[DatasetUsage]) -> list[str]:
    """One line per dataset: tokens available / requested / epochs (dry runs and the run report)."""
    return [f"{u.prefix}: weight {u.weight:.3g}, {u.available:,} tokens available, {u.requested:,} requested, "
            f"{u.epochs:.3f} epochs" for u in usages]


def build_datasets(blend: list[list], split: str, seq_length: int, num_samples: tuple[int, int, int], seed: int,
                   tok: TokenizerInfo, cache_dir: str, eod_mask_loss: bool):
    """(train, valid, test) GPTDatasets over the weighted blend of indexed-dataset prefixes. The train dataset is
    one shuffle of the blend, `num_samples[0]` long, fixed by (blend, split, seq_length, seed, num_samples): runs
    that build it alike read the same sample at the same index (a recipe's stages each read their own range)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    corpus_usage(blend, split, seq_length, num_samples)  # missing files and empty splits, named
    prefixes = [str(p) for _, p in blend]
    weights = [float(w) for w, _ in blend]
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights if len(prefixes) > 1 else None),
        split=split, tokenizer=tok, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss, create_attention_mask=False, path_to_cache=cache_dir, mmap_bin_files=True,
    )
    return BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config).build()


def microbatches(dataset, step: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 offset: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's micro-batches of global step `step`: stream samples offset + [step*G, (step+1)*G) split across
    DP ranks."""
    base = offset + step * global_batch
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
