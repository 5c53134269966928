"""Evaluate a Megatron-Core model at any TP/PP/EP layout: LM loss, perplexity, accuracy, MTP acceptance.

Forwards go through models/forward.py (megatron-core's pipeline schedules); metrics are computed on the last
pipeline stage from vocab-parallel logits (eval/metrics.py) and summed over data-parallel ranks. Rows are dealt to
DP ranks round-robin; a rank short of rows runs copies of a row with weight 0, so every rank runs the same
forwards (expert-parallel collectives span DP ranks) and results do not depend on the layout.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from megatron_slim.eval.generate import greedy_continuation
from megatron_slim.eval.metrics import (
    acceptance_counts,
    acceptance_summary,
    draft_windows,
    lm_sums,
    vocab_parallel_argmax,
)
from megatron_slim.eval.stats import mean_se
from megatron_slim.models.config import ModelConfig
from megatron_slim.models.forward import forward_rows, main_head_only, tp_group
from megatron_slim.models.unwrap import unwrap_model
from megatron_slim.runtime.distributed import local_device


def dp_share(rows: int, dp: int, dp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row indices, weights) of this DP rank: rows dp_rank, dp_rank + dp, ..., padded with weight-0 copies of row 0
    up to ceil(rows / dp) so that every rank holds the same number."""
    mine = torch.arange(dp_rank, rows, dp)
    pad = math.ceil(rows / dp) - len(mine)
    return (torch.cat([mine, torch.zeros(pad, dtype=torch.long)]),
            torch.cat([torch.ones(len(mine)), torch.zeros(pad)]).double())


def _head_logits(inner: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel logits [b, S, V/tp] of the shared output layer on MTP hidden states [S, b, H]."""
    weight = inner.shared_embedding_or_output_weight() if inner.share_embeddings_and_output_weights else None
    return inner.output_layer(hidden, weight=weight)[0].transpose(0, 1)


@contextmanager
def recursive_mtp_depths(model: torch.nn.Module, depths: int) -> Iterator[list[list[torch.Tensor]]]:
    """While active, each forward of the MTP block continues to `depths` by calling its last MTP layer again.

    megatron-core's MultiTokenPredictionLayer takes (input_ids, position_ids, hidden_states, ...) and returns the
    next depth's (hidden_states, input_ids, position_ids, padding_mask), rolling the ids by one itself; a hook
    records the last layer's call and output, and a hook on the block feeds that output back into the same layer
    with the same mask and rotary embeddings. Yields a list that receives, per forward, the hidden states [S, b, H]
    of depths L+1..depths (L = mtp_num_layers); it stays empty when depths <= L."""
    inner = unwrap_model(model)
    extra: list[list[torch.Tensor]] = []
    num_layers = inner.config.mtp_num_layers or 0
    if depths <= num_layers or not getattr(inner, "mtp_process", False):
        yield extra
        return
    last = inner.mtp.layers[-1]
    calls: list[tuple[dict, tuple]] = []

    def on_layer(module, args, kwargs, out) -> None:
        calls.append((kwargs, out))

    def on_block(module, args, out) -> None:
        kwargs, (hidden, ids, pos, pad) = calls[-1]
        hiddens = []
        for _ in range(depths - num_layers):
            hidden, ids, pos, pad = last(**{**kwargs, "hidden_states": hidden, "input_ids": ids,
                                            "position_ids": pos, "padding_mask": pad})
            hiddens.append(hidden)
        calls.clear()
        extra.append(hiddens)

    handles = [last.register_forward_hook(on_layer, with_kwargs=True), inner.mtp.register_forward_hook(on_block)]
    try:
        yield extra
    finally:
        for h in handles:
            h.remove()


def evaluate(model: torch.nn.Module, cfg: ModelConfig, windows: torch.Tensor, micro_batch: int, mtp_k: int = 4,
             prompts: torch.Tensor | None = None, gen_tokens: int = 32) -> dict:
    """Collective over every rank; returns the same dict on each.

    windows [n, S] (the same on every rank): the loss and top-1 accuracy of the main head predicting tokens
    1..S-1 of each window from its prefix. prompts [m, P]: MTP speculative acceptance (eval/metrics.py) over each
    prompt's `gen_tokens`-token greedy continuation with `mtp_k` drafts per step; skipped (empty acceptance,
    mean_accepted None) without prompts, with mtp_k = 0 or for a model without MTP layers.

    Returns {tokens, loss (mean nats/token), loss_se, window_losses, ppl, accuracy, mtp_acceptance {k: rate},
    mean_accepted, mtp_positions}. window_losses holds each window's mean loss in the order of `windows`: every
    window is scored by one rank in a forward of its own row, whatever the layout; every window has S-1 tokens, so
    `loss` (token-weighted) is their mean, and loss_se their standard error (eval/stats.py; nan for one window).
    """
    from megatron.core import parallel_state as ps

    if micro_batch < 1 or len(windows) == 0 or windows.shape[1] < 2:
        raise ValueError(f"need micro_batch >= 1 and windows [n >= 1, S >= 2], got {micro_batch} and "
                         f"{tuple(windows.shape)}")
    with_mtp = prompts is not None and mtp_k > 0 and cfg.mtp_num_layers > 0
    if with_mtp and (gen_tokens <= mtp_k or prompts.shape[1] < 1 or len(prompts) == 0):
        raise ValueError(f"MTP acceptance needs non-empty prompts and gen_tokens > mtp_k, got {tuple(prompts.shape)}"
                         f", gen_tokens {gen_tokens}, mtp_k {mtp_k}")
    device, tp = local_device(), tp_group()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    reporting = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    k = mtp_k if with_mtp else 0
    # tokens, correct, acceptance counts of depths 1..k, drafting positions, then each window's summed loss
    sums = torch.zeros(3 + k + len(windows), dtype=torch.float64, device=device)
    window_sums = sums[3 + k:]
    model.eval()

    idx, weights = dp_share(len(windows), dp, dp_rank)
    tokens = windows[idx].to(device)
    owner_of = [window if weight else None for window, weight in zip(idx.tolist(), weights.tolist())]  # None: pad

    def on_logits(logits: torch.Tensor, rows: slice) -> None:
        for r, window in enumerate(owner_of[rows]):  # row by row: a sum per window
            if window is None:
                continue
            row = tokens[rows.start + r]
            s = lm_sums(logits[r, :-1], row[1:], None, tp)
            if reporting:
                window_sums[window] += s.loss
                sums[:2] += torch.tensor([s.tokens, s.correct], dtype=torch.float64, device=device)

    with main_head_only(unwrap_model(model)):  # the loss reads the main head: MTP depths would be computed unread
        forward_rows(model, tokens, micro_batch, on_logits)

    if with_mtp:
        idx, weights = dp_share(len(prompts), dp, dp_rank)
        weights = weights.to(device)
        first = prompts.shape[1] - 1
        seqs = greedy_continuation(model, prompts[idx].to(device), gen_tokens, micro_batch)
        inner = unwrap_model(model)
        with recursive_mtp_depths(model, k) as extra:
            def on_mtp_logits(depth_logits: list[torch.Tensor], rows: slice) -> None:
                depth_logits = depth_logits[:k]
                if extra:
                    depth_logits += [_head_logits(inner, h)[:, :seqs.shape[1]] for h in extra.pop(0)]
                ids = [vocab_parallel_argmax(lg, tp) for lg in depth_logits]
                drafts, targets = draft_windows(ids, seqs[rows], first)
                w = weights[rows].repeat_interleave(len(drafts) // len(weights[rows]))
                if reporting:
                    sums[2:2 + k] += acceptance_counts(drafts, targets, w)
                    sums[2 + k] += w.sum()

            forward_rows(model, seqs, micro_batch, lambda logits, rows: None, on_mtp_logits)

    dist.all_reduce(sums)  # one reporting rank per DP replica contributes; each window is owned by one replica
    count, correct = sums[:2].tolist()
    loss = window_sums.sum().item() / count
    window_losses = (window_sums / (windows.shape[1] - 1)).tolist()
    result = {"tokens": int(count), "loss": loss, "loss_se": mean_se(window_losses)[1],
              "window_losses": window_losses, "ppl": math.exp(loss), "accuracy": correct / count,
              "mtp_acceptance": {}, "mean_accepted": None, "mtp_positions": 0}
    if with_mtp:
        summary = acceptance_summary(sums[2:2 + k], sums[2 + k].item())
        result.update(mtp_acceptance=summary["acceptance"], mean_accepted=summary["mean_accepted"],
                      mtp_positions=int(sums[2 + k].item()))
    return result
