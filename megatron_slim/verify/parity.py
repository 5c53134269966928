"""Logit parity between a Hugging Face checkpoint (transformers) and its Megatron-Core conversion.

Both models see the same tokens; Megatron-Core runs at the requested TP/PP/EP layout. One rank (last pipeline
stage, first TP and DP rank) runs the transformers reference and reports max/mean |logit diff| and top-1
agreement, and the same for each MTP depth against a float64 reference of the HF MTP tensors.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# torch is imported where tensors are made: the CLI imports this module (Thresholds) to parse its flags, and every
# command would pay torch's import (seconds of CPU) before it starts
if TYPE_CHECKING:
    import torch


@dataclass
class Parity:
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float

    @classmethod
    def of(cls, ours: torch.Tensor, ref: torch.Tensor) -> "Parity":
        diff = (ours.double() - ref.double()).abs()
        agree = (ours.argmax(-1) == ref.argmax(-1)).double().mean()
        return cls(diff.max().item(), diff.mean().item(), agree.item())


@dataclass(frozen=True)
class Thresholds:
    """What counts as a faithful conversion. The defaults pass any correct fp32 or bf16 conversion (top-1 ties
    aside) and fail a model with the wrong weights or config, which agrees on almost no next token."""
    min_top1_agreement: float = 0.98  # every head
    max_abs_diff: float | None = None  # main head; off by default (its scale depends on the model and dtype)


def failures(report: dict, limits: Thresholds) -> list[str]:
    """Which heads of a `hf_parity` report miss the thresholds, one line each (empty: parity holds)."""
    out = [f"{head}: top-1 agreement {m['top1_agreement'] * 100:.2f}% < {limits.min_top1_agreement * 100:.2f}%"
           for head, m in report.items() if head != "layout" and m["top1_agreement"] < limits.min_top1_agreement]
    if limits.max_abs_diff is not None and report["main"]["max_abs_diff"] > limits.max_abs_diff:
        out.append(f"main: max |diff| {report['main']['max_abs_diff']:.3e} > {limits.max_abs_diff:.3e}")
    return out


def sample_tokens(vocab_size: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    import torch

    return torch.randint(0, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def megatron_logits(mcore_dir: str | Path, tokens: torch.Tensor, parallel, micro_batch_size: int = 1,
                    allow_nonfinite: bool = False):
    """(cfg, main logits, per-depth MTP logits) on the reporting rank; (cfg, None, []) elsewhere."""
    from megatron.core import parallel_state

    from megatron_slim.checkpoint.mcore import load_model, load_model_config
    from megatron_slim.models.builder import build_model
    from megatron_slim.models.forward import full_logits_with_mtp
    from megatron_slim.runtime.distributed import init_model_parallel

    init_model_parallel(parallel)
    cfg = load_model_config(mcore_dir)
    model = build_model(cfg, parallel)
    load_model(model, mcore_dir, allow_nonfinite=allow_nonfinite)
    model.eval()
    logits, mtp = full_logits_with_mtp(model, tokens, micro_batch_size)
    reporter = (logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0
                and parallel_state.get_data_parallel_rank() == 0)
    return cfg, (logits if reporter else None), (mtp if reporter else [])


def hf_parity(hf_dir: str | Path, tokens: torch.Tensor, logits: torch.Tensor, mtp: list[torch.Tensor]) -> dict:
    """Compare against transformers (fp32) and, for MTP depths, the float64 HF-layout reference."""
    import torch

    from megatron_slim.verify.hf_reference import (
        load_hf_reference,
        mtp_reference_logits,
        reference_hidden,
        reference_logits,
    )

    ref_model = load_hf_reference(hf_dir, dtype=torch.float32)
    report = {"main": asdict(Parity.of(logits, reference_logits(ref_model, tokens)))}
    if mtp:
        hidden = reference_hidden(ref_model, tokens)
        for depth, ours in enumerate(mtp, start=1):
            ref = mtp_reference_logits(hf_dir, tokens, hidden, depth=depth)
            n = ref.shape[1]  # the reference covers the positions that have a next token
            report[f"mtp{depth}"] = asdict(Parity.of(ours[:, :n], ref))
    return report
