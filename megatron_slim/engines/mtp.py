"""Give a Megatron checkpoint fresh multi-token-prediction depths (`add_mtp_depths`): a student whose teacher has
no MTP head (or fewer depths than wanted) gains depths initialised as megatron-core initialises a new model,
everything else loaded from the checkpoint unchanged; the MTP loss terms (LM and KD) then train them."""
from __future__ import annotations

import re
from pathlib import Path

from megatron_slim.errors import UserError
from megatron_slim.runtime.outputs import claim_output


def add_mtp_depths(src: str | Path, out: str | Path, depths: int, seed: int = 1234) -> None:
    """Write `out`: the checkpoint `src` with `depths` more MTP depths (a one-process job; writes `out` through a
    `runtime.outputs.claim_output`: staged, replacing only an earlier output of ours)."""
    import torch

    from megatron_slim.checkpoint.files import TOKENIZER_DIR, copy_side_files
    from megatron_slim.checkpoint.mcore import load_model, load_model_config, save_model
    from megatron_slim.models.builder import BuildOptions, build_model
    from megatron_slim.runtime.distributed import ParallelConfig, init_model_parallel

    if depths < 1:
        raise UserError(f"add {depths} MTP depths: give at least one")
    src, out = Path(src), Path(out)
    cfg = load_model_config(src)
    have = cfg.mtp_num_layers
    grown = cfg.replace(mtp_num_layers=have + depths)
    torch.manual_seed(seed)
    init_model_parallel(ParallelConfig(), seed=seed)
    model = build_model(grown, ParallelConfig(), BuildOptions(perform_initialization=True))
    fresh = re.compile(r"^mtp\.layers\.(\d+)\.")
    load_model(model, src, keep=lambda key: bool((m := fresh.match(key)) and int(m.group(1)) >= have))
    with claim_output(out, inputs=[src], overwrite=True) as staging:
        save_model(model, staging, grown)
        if (src / TOKENIZER_DIR).is_dir():
            copy_side_files(src / TOKENIZER_DIR, staging / TOKENIZER_DIR)
