"""Forward passes through megatron-core's schedules, so the same code serves any TP/PP/EP layout."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_slim.models.unwrap import unwrap_model


def position_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel logits [..., V/tp] -> full [..., V] (only for evaluation/verification, never for losses)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return logits
    return gather_from_tensor_model_parallel_region(logits)


def mtp_logits_from_hidden(model: torch.nn.Module, mtp_hidden: torch.Tensor) -> list[torch.Tensor]:
    """Vocab-parallel logits [b, S, V/tp] of each MTP depth from the MTP block's output, which megatron-core
    concatenates along the sequence as [main; depth 1; ...] (the same split its MTP loss uses)."""
    inner = unwrap_model(model)
    chunks = torch.chunk(mtp_hidden, 1 + inner.config.mtp_num_layers, dim=0)[1:]
    weight = inner.shared_embedding_or_output_weight() if inner.share_embeddings_and_output_weights else None
    return [inner.output_layer(h, weight=weight)[0].transpose(0, 1) for h in chunks]


@contextmanager
def main_head_only(inner: torch.nn.Module) -> Iterator[None]:
    """While active, forwards of `inner` (the bare model) skip its MTP block on the stage that also holds the output
    layer, for forwards that read the main head only: without labels megatron-core still runs every MTP layer and,
    outside inference mode, each depth's output layer and a cross entropy against the rolled input ids
    (`process_mtp_loss`), none of which changes the main head's logits (the MTP block passes the decoder's output
    through as the first chunk of its own)."""
    if not (getattr(inner, "mtp_process", False) and inner.post_process):
        yield
        return
    inner.mtp_process = False
    try:
        yield
    finally:
        inner.mtp_process = True


def _gather_positions(hidden: torch.Tensor, positions: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """The final hidden states [S, b, h] at positions[r, k] of each row r: [K, b, h]. Under sequence parallelism
    `hidden` is this rank's [S/tp, b, h] slice and so is the result (K padded to a multiple of tp by repeating
    the last column, which the caller drops with the padding)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import (
        gather_from_sequence_parallel_region,
        scatter_to_sequence_parallel_region,
    )

    if sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        tp = ps.get_tensor_model_parallel_world_size()
        positions = torch.cat([positions, positions[:, -1:].expand(-1, -positions.shape[1] % tp)], dim=1)
    index = positions.t().to(hidden.device)[:, :, None].expand(-1, -1, hidden.shape[-1])
    picked = hidden.gather(0, index)
    return scatter_to_sequence_parallel_region(picked) if sequence_parallel else picked


def forward_microbatches(model: torch.nn.Module, tokens: torch.Tensor, micro_batch_size: int,
                         on_logits: Callable[[torch.Tensor, slice], None],
                         on_mtp_logits: Callable[[list[torch.Tensor], slice], None] | None = None, *,
                         inference_context: Any = None, row_offset: int = 0,
                         positions: torch.Tensor | None = None) -> None:
    """Forward-only pass of `tokens` [B, S] in micro-batches; on the last pipeline stage `on_logits(logits, rows)`
    receives each micro-batch's vocab-parallel logits [b, S, V/tp] and the batch rows they belong to, and
    `on_mtp_logits(per_depth_logits, rows)` the MTP heads' logits (position t of depth k predicts token t+k+1).

    `positions` [B, K] (long): only the logits at positions[r, k] of each row r are computed, [b, K, V/tp] (column
    k is position positions[r, k]; under sequence parallelism K is padded to a multiple of tp, see forward_rows).
    The final hidden states are gathered before the output layer, so it and everything after run on K positions
    instead of S: scoring a continuation needs its own positions only. The MTP block reads every position's
    hidden state, so it is skipped (`main_head_only`), and `on_mtp_logits` cannot be asked for.

    With a static `inference_context` (generation) the tokens continue the cached sequences at its
    `sequence_len_offset` and row `row_offset + r` of the batch uses cache row `row_offset + r`; every pipeline
    stage caches its own layers. The caller advances `sequence_len_offset` after the pass."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    inner = unwrap_model(model)
    batch, seq = tokens.shape
    if batch % micro_batch_size:
        raise ValueError(f"batch {batch} is not divisible by micro_batch_size {micro_batch_size}")
    if positions is not None and (on_mtp_logits is not None or positions.shape[0] != batch):
        raise ValueError(f"positions {tuple(positions.shape)} must have one row per row of tokens {tuple(tokens.shape)}"
                         " and no MTP logits may be asked for with them")
    captured: list[torch.Tensor] = []
    selected: list[torch.Tensor] = []  # the positions of the micro-batch in flight
    chunks = [slice(i, i + micro_batch_size) for i in range(0, batch, micro_batch_size)]
    it = iter(chunks)

    def step(data_iterator, model_chunk):
        rows = next(data_iterator)
        mb = tokens[rows]
        if positions is not None:
            selected[:] = [positions[rows]]
        if inference_context is None:
            out = model_chunk(mb, position_ids_for(mb), None)
        else:
            inference_context.batch_size_offset = row_offset + rows.start
            out = model_chunk(mb, position_ids_for(mb) + inference_context.sequence_len_offset, None,
                              inference_context=inference_context)

        def collect(output: torch.Tensor):
            on_logits(output, rows)
            if captured:
                on_mtp_logits(mtp_logits_from_hidden(model, captured.pop()), rows)
            return output.new_zeros(()), {}

        return out, collect

    with ExitStack() as stack:
        if on_mtp_logits is not None and getattr(inner, "mtp_process", False):
            stack.callback(inner.mtp.register_forward_hook(lambda mod, args, out: captured.append(out)).remove)
        if positions is not None:
            stack.enter_context(main_head_only(inner))
        if positions is not None and inner.post_process:
            sp = inner.config.sequence_parallel
            stack.callback(inner.decoder.register_forward_hook(
                lambda mod, args, out: _gather_positions(out, selected[0], sp)).remove)
        with torch.no_grad():
            get_forward_backward_func()(
                forward_step_func=step, data_iterator=it, model=[model], num_microbatches=len(chunks),
                seq_length=seq, micro_batch_size=micro_batch_size, forward_only=True,
            )


def full_logits(model: torch.nn.Module, tokens: torch.Tensor, micro_batch_size: int = 1) -> torch.Tensor | None:
    """Full-vocab logits [B, S, V] on last-stage ranks (None on other stages)."""
    return full_logits_with_mtp(model, tokens, micro_batch_size)[0]


def full_logits_with_mtp(model: torch.nn.Module, tokens: torch.Tensor, micro_batch_size: int = 1
                         ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """(main logits [B, S, V], [MTP depth-k logits [B, S, V]]) on last-stage ranks; (None, []) elsewhere."""
    from megatron.core import parallel_state

    main: list[tuple[int, torch.Tensor]] = []
    mtp: list[tuple[int, list[torch.Tensor]]] = []
    forward_microbatches(model, tokens, micro_batch_size,
                         lambda lg, rows: main.append((rows.start, gather_vocab(lg))),
                         lambda lgs, rows: mtp.append((rows.start, [gather_vocab(lg) for lg in lgs])))
    if not parallel_state.is_pipeline_last_stage():
        return None, []
    logits = torch.cat([lg for _, lg in sorted(main, key=lambda r: r[0])], dim=0)
    mtp.sort(key=lambda r: r[0])
    depths = [torch.cat([lgs[d] for _, lgs in mtp], dim=0) for d in range(len(mtp[0][1]))] if mtp else []
    return logits, depths


def tp_group() -> dist.ProcessGroup | None:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None


def right_padded(rows: list[list[int]], width: int) -> torch.Tensor:
    """Token rows right-padded with token 0 to `width`, [len(rows), width] (every layer is causal, so padding on
    the right changes nothing before it)."""
    out = torch.zeros(len(rows), width, dtype=torch.long)
    for r, ids in enumerate(rows):
        out[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def forward_rows(model: torch.nn.Module, tokens: torch.Tensor, micro_batch: int,
                  on_logits: Callable[[torch.Tensor, slice], None],
                  on_mtp_logits: Callable[[list[torch.Tensor], slice], None] | None = None, *,
                  inference_context: Any = None, positions: torch.Tensor | None = None) -> None:
    """forward_microbatches over every row of `tokens` [B, S], the remainder as one smaller micro-batch; callbacks
    get logits of the S positions (of the K columns of `positions` [B, K] when given) and row slices of `tokens`;
    `inference_context` and `positions` as there.

    Under sequence parallelism the sequence must split evenly over TP ranks, so it is padded on the right with
    token 0; every layer is causal (attention, Gated DeltaNet, MTP) and routing is per token, so the padding
    changes nothing at positions < S."""
    from megatron.core import parallel_state as ps

    seq = tokens.shape[1]
    width = seq if positions is None else positions.shape[1]
    multiple = ps.get_tensor_model_parallel_world_size() if unwrap_model(model).config.sequence_parallel else 1
    padded = F.pad(tokens, (0, -seq % multiple))
    bulk = len(tokens) - len(tokens) % micro_batch
    for lo, hi, size in ((0, bulk, micro_batch), (bulk, len(tokens), len(tokens) - bulk)):
        if hi == lo:
            continue

        def main(logits: torch.Tensor, rows: slice, lo: int = lo) -> None:
            on_logits(logits[:, :width], slice(rows.start + lo, rows.stop + lo))

        def mtp(depth_logits: list[torch.Tensor], rows: slice, lo: int = lo) -> None:
            on_mtp_logits([lg[:, :seq] for lg in depth_logits], slice(rows.start + lo, rows.stop + lo))
        forward_microbatches(model, padded[lo:hi], size, main, None if on_mtp_logits is None else mtp,
                             inference_context=inference_context, row_offset=lo,
                             positions=None if positions is None else positions[lo:hi])
