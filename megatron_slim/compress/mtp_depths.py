"""Freshly initialised students: `save_initialised` builds a model as megatron-core initialises a new one (at a
layout and seed) and writes it as a Megatron checkpoint; `add_mtp_depths` uses it to give a checkpoint fresh
multi-token-prediction depths (a student whose teacher has no MTP head, or fewer depths than wanted), everything
else loaded from the checkpoint unchanged; the MTP loss terms (LM and KD) then train them. A recipe's
`init: random` student is the other user."""
from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from megatron_slim.errors import UserError
from megatron_slim.models.config import ModelConfig
from megatron_slim.runtime.layout import ParallelLayout
from megatron_slim.runtime.outputs import PARTIAL, claim_output, sibling
from megatron_slim.runtime.seed import DEFAULT_SEED


def save_initialised(cfg: ModelConfig, parallel: ParallelLayout, seed: int, out: Path, tokenizer: Path | None = None,
                     load: Callable[[object], None] | None = None) -> None:
    """Write `out`: `cfg` built at `parallel` and initialised with `seed` (then `load(model)`, when given, overwrites
    what it loads), with `tokenizer`'s files copied in. Every rank of the model-parallel world calls it; rank 0 claims
    `out` (runtime.outputs.claim_output: locked, replacing only an earlier output of ours) and every rank saves into
    its staging directory, which replaces `out` at the end."""
    import torch
    import torch.distributed as dist

    from megatron_slim.checkpoint.files import TOKENIZER_DIR, copy_side_files
    from megatron_slim.checkpoint.mcore import save_model
    from megatron_slim.models.builder import BuildOptions, build_model
    from megatron_slim.runtime.distributed import init_model_parallel

    torch.manual_seed(seed)
    init_model_parallel(parallel, seed=seed)
    model = build_model(cfg, parallel, BuildOptions(perform_initialization=True))
    if load is not None:
        load(model)
    first = dist.get_rank() == 0
    with ExitStack() as held:
        if first:
            held.enter_context(claim_output(out, overwrite=True))
        dist.barrier()
        staging = sibling(out, PARTIAL)
        save_model(model, staging, cfg)
        if first and tokenizer is not None:
            copy_side_files(tokenizer, staging / TOKENIZER_DIR)
    dist.barrier()


def add_mtp_depths(src: str | Path, out: str | Path, depths: int, seed: int = DEFAULT_SEED) -> None:
    """Write `out`: the checkpoint `src` with `depths` more MTP depths (a one-process job)."""
    from megatron_slim.checkpoint.files import Checkpoint
    from megatron_slim.checkpoint.mcore import load_model, load_model_config

    if depths < 1:
        raise UserError(f"add {depths} MTP depths: give at least one")
    src, out = Path(src), Path(out)
    cfg = load_model_config(src)
    have = cfg.mtp_num_layers
    fresh = re.compile(r"^mtp\.layers\.(\d+)\.")

    def load(model: object) -> None:
        load_model(model, src, keep=lambda key: bool((m := fresh.match(key)) and int(m.group(1)) >= have))

    save_initialised(cfg.replace(mtp_num_layers=have + depths), ParallelLayout(), seed, out,
                     Checkpoint(src, "mcore").tokenizer_dir, load)
