"""Evaluation metrics on plain tensors: language-model sums and MTP speculative acceptance.

Logits may be full [..., V] or this rank's vocabulary shard [..., V/tp] in megatron-core's vocab-parallel layout
(tensor-parallel rank r holds the contiguous slice [r*V/tp, (r+1)*V/tp)); `tp_group=None` means full logits. The
full vocabulary is never gathered: the loss all-reduces per-token maxima and sums (distill/losses.py), the argmax
all-reduces per-token maxima and indices. Every rank of `tp_group` must pass the same labels and mask.

MTP speculative acceptance (`acceptance_counts`, `draft_windows`): a sequence z = prompt (P tokens) followed by
the model's own greedy continuation (n tokens, each the main head's argmax after a full forward of the prefix).
At a drafting position t the main head has just produced z[t+1]; MTP depth j (j = 1..K) drafts z[t+j+1]: depth 1
combines the main model's final hidden state at t with the embedding of z[t+1], depth j the depth j-1 MTP hidden
state at t with the embedding of depth j-1's draft, through MTP layer min(j, L) of a model with L MTP layers (the
last layer is reused recursively, as vLLM does with Qwen3-Next's single MTP layer); the attention of depth j runs
causally over the depth-j states of positions <= t. A chain stops at its first wrong draft, so with k drafts per
step the number accepted is the length of the matching prefix. Drafting positions are t = P-1 .. P+n-K-2 (every
target of every depth lies in the greedy continuation), N = n - K positions per prompt, and

    acceptance@k  = #{t : drafts 1..k at t all equal z[t+2..t+k+1]} / N      (k = 1..K, non-increasing in k)
    mean_accepted = sum_k acceptance@k = E[draft tokens accepted per verification step with K drafts]

(tokens emitted per step are 1 + mean_accepted: the main head's own token is always kept). Feeding the greedy
tokens z[t+j] instead of the drafts (teacher forcing: one forward over z) gives the same counts, because a chain
only reaches depth j while every earlier draft equalled the greedy token it is replaced by. This is the per-position
(stationary) rate; a real decoding run skips the positions its accepted tokens cover.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_slim.distill.losses import lm_loss


@dataclass
class LMSums:
    """Summed next-token statistics of a set of positions (sums, so shards and batches just add up)."""

    loss: float  # summed cross entropy, nats
    tokens: int
    correct: int  # positions whose top-1 prediction is the label


def vocab_parallel_argmax(logits: Tensor, tp_group: dist.ProcessGroup | None = None) -> Tensor:
    """Global token ids of the maximum logit, [...]; ties go to the lowest id, as torch.argmax does on full logits.

    Two all-reduces of one value per token (max logit, then the lowest id reaching it) instead of a vocab gather."""
    local_max, local_idx = logits.max(dim=-1)
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return local_idx
    global_max = local_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
    offset = dist.get_rank(tp_group) * logits.shape[-1]
    none = torch.iinfo(torch.int64).max
    ids = torch.where(local_max == global_max, local_idx + offset, torch.full_like(local_idx, none))
    dist.all_reduce(ids, op=dist.ReduceOp.MIN, group=tp_group)
    return ids


def token_logprobs(logits: Tensor, labels: Tensor, tp_group: dist.ProcessGroup | None = None) -> Tensor:
    """log softmax(logits)[label] per position, [...] in float32 (float64 for float64 logits): what lm-eval's
    loglikelihood sums. Two all-reduces over `tp_group` (per-position maxima, then exp-sums and the label's logit
    from the shard that owns it) instead of a vocab gather."""
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} != logits token shape {tuple(logits.shape[:-1])}")
    x = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    shard = x.shape[-1]
    local = labels - (dist.get_rank(tp_group) * shard if tp_group is not None else 0)
    owned = (local >= 0) & (local < shard)
    shift = x.amax(-1)
    if tp_group is not None:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=tp_group)
    x = x - shift[..., None]
    picked = torch.where(owned, x.gather(-1, local.clamp(0, shard - 1)[..., None])[..., 0], torch.zeros_like(shift))
    sums = torch.stack([x.exp().sum(-1), picked])
    if tp_group is not None:
        dist.all_reduce(sums, group=tp_group)
    return sums[1] - sums[0].log()


def lm_sums(logits: Tensor, labels: Tensor, loss_mask: Tensor | None = None,
            tp_group: dist.ProcessGroup | None = None) -> LMSums:
    """Summed cross entropy, token count and top-1 hits of `logits` [..., V or V/tp] against `labels` [...] (global
    vocabulary ids) over the positions where `loss_mask` (0/1, shape of labels) is 1; None keeps every position."""
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} != logits token shape {tuple(logits.shape[:-1])}")
    keep = torch.ones_like(labels, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
    tokens = int(keep.sum())
    if tokens == 0:
        return LMSums(0.0, 0, 0)
    with torch.no_grad():
        mean = lm_loss(logits, labels, keep.to(logits.dtype), tp_group).double()
        hits = (vocab_parallel_argmax(logits, tp_group) == labels) & keep
    return LMSums(mean.item() * tokens, tokens, int(hits.sum()))


def draft_windows(depth_ids: list[Tensor], tokens: Tensor, first: int) -> tuple[Tensor, Tensor]:
    """Align MTP drafts with the tokens they guess: (drafts [N, K], targets [N, K]) over drafting positions.

    depth_ids[j-1] [B, S] holds depth j's argmax at every position of `tokens` [B, S] (position t of depth j
    predicts token t+j+1); drafting positions are t = first .. S-K-2, so N = B * (S-K-1-first)."""
    k = len(depth_ids)
    seq = tokens.shape[1]
    last = seq - k - 2
    if k < 1 or first < 0 or last < first:
        raise ValueError(f"no drafting position: {k} depths, first position {first}, sequence length {seq}")
    positions = torch.arange(first, last + 1, device=tokens.device)
    drafts = torch.stack([ids[:, positions] for ids in depth_ids], dim=-1)
    targets = torch.stack([tokens[:, positions + j + 1] for j in range(1, k + 1)], dim=-1)
    return drafts.reshape(-1, k), targets.reshape(-1, k)


def acceptance_counts(drafts: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
    """counts [K] (float64): counts[k-1] = (weighted) number of rows whose drafts 1..k all equal their targets.

    drafts, targets [N, K]; weights [N] (None: 1 each) lets padded rows count 0."""
    matched = (drafts == targets).long().cumprod(dim=-1).double()
    if weights is not None:
        matched = matched * weights.double()[:, None]
    return matched.sum(dim=0)


def acceptance_summary(counts: Tensor, positions: float) -> dict:
    """{acceptance: {k: rate}, mean_accepted: expected accepted drafts per step} from `acceptance_counts` totals."""
    if positions <= 0:
        raise ValueError("no drafting positions")
    rates = {k: c / positions for k, c in enumerate(counts.tolist(), start=1)}
    return {"acceptance": rates, "mean_accepted": sum(rates.values())}
