"""Forward passes through megatron-core's schedules, so the same code serves any TP/PP/EP layout."""
from __future__ import annotations

from typing import Callable

import torch


def position_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel logits [..., V/tp] -> full [..., V] (only for evaluation/verification, never for losses)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return logits
    return gather_from_tensor_model_parallel_region(logits)


def forward_microbatches(model: torch.nn.Module, tokens: torch.Tensor, micro_batch_size: int,
                         on_logits: Callable[[torch.Tensor, slice], None]) -> None:
    """Forward-only pass of `tokens` [B, S] in micro-batches; on the last pipeline stage `on_logits(logits, rows)`
    receives each micro-batch's vocab-parallel logits [b, S, V/tp] and the batch rows they belong to."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = tokens.shape
    if batch % micro_batch_size:
        raise ValueError(f"batch {batch} is not divisible by micro_batch_size {micro_batch_size}")
    chunks = [slice(i, i + micro_batch_size) for i in range(0, batch, micro_batch_size)]
    it = iter(chunks)

    def step(data_iterator, model_chunk):
        rows = next(data_iterator)
        mb = tokens[rows]
        out = model_chunk(mb, position_ids_for(mb), None)

        def collect(output: torch.Tensor):
            on_logits(output, rows)
            return output.new_zeros(()), {}

        return out, collect

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=step, data_iterator=it, model=[model], num_microbatches=len(chunks),
            seq_length=seq, micro_batch_size=micro_batch_size, forward_only=True,
        )


def full_logits(model: torch.nn.Module, tokens: torch.Tensor, micro_batch_size: int = 1) -> torch.Tensor | None:
    """Full-vocab logits [B, S, V] on last-stage ranks (None on other stages)."""
    from megatron.core import parallel_state

    out: list[tuple[slice, torch.Tensor]] = []
    forward_microbatches(model, tokens, micro_batch_size, lambda lg, rows: out.append((rows, gather_vocab(lg))))
    if not parallel_state.is_pipeline_last_stage():
        return None
    return torch.cat([lg for _, lg in sorted(out, key=lambda r: r[0].start)], dim=0)
