"""compress/mtp_depths.py: a Megatron checkpoint gains fresh MTP depths; every existing weight is kept bit for bit,
the new depth is initialised (not left empty), and the main head computes exactly what it did before."""
from __future__ import annotations

from pathlib import Path

import torch

from support.dist import run_distributed
from support.hf_checkpoints import build_tiny_hf
from support.tiny_models import mixtral


def _state(rank: int, world: int, ckpt: str) -> dict[str, torch.Tensor]:
    from megatron_slim.checkpoint.mcore import load_model, load_model_config
    from megatron_slim.models.builder import BuildOptions, build_model
    from megatron_slim.runtime.distributed import init_model_parallel
    from megatron_slim.runtime.layout import ParallelLayout

    init_model_parallel(ParallelLayout())
    cfg = load_model_config(ckpt)
    model = build_model(cfg, ParallelLayout(), BuildOptions(perform_initialization=False))
    load_model(model, ckpt)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        logits = model(tokens, torch.arange(16)[None].expand(2, -1), None)
    return {"logits": logits} | {k: v.detach().clone() for k, v in model.state_dict().items()
                                 if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def _grow_between_reads(rank: int, world: int, src: str, out: str) -> dict[str, dict[str, torch.Tensor]]:
    """src's state, then add_mtp_depths(src -> out), then out's state: one process (one megatron-core import)."""
    from megatron_slim.compress.mtp_depths import add_mtp_depths

    before = _state(rank, world, src)
    add_mtp_depths(src, out, 1, seed=3)
    return {"before": before, "after": _state(rank, world, out)}


def test_added_mtp_depth_is_fresh_and_the_rest_unchanged(tmp_path: Path) -> None:
    from megatron_slim.checkpoint.convert import hf_to_mcore

    build_tiny_hf(mixtral(), seed=0).save_pretrained(tmp_path / "hf")
    hf_to_mcore(tmp_path / "hf", tmp_path / "mc", progress=False)
    got = run_distributed(_grow_between_reads, 1, str(tmp_path / "mc"), str(tmp_path / "grown"))[0]
    before, after = got["before"], got["after"]
    fresh = sorted(k for k in after if k.startswith("mtp."))
    assert fresh and not any(k.startswith("mtp.") for k in before)
    assert set(after) - set(fresh) == set(before)
    for key in before:
        assert torch.equal(before[key], after[key]), key  # weights, and the main head's logits
    assert all(after[k].abs().sum() > 0 for k in fresh if k.endswith("weight"))

