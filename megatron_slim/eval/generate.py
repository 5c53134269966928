"""Greedy generation by a megatron-core model at any layout, with a generation cache where it serves.

Two ways to produce each row's next token, the same tokens either way:

- cached: a `GenerationContext` (models/gdn.py: megatron-core's static KV-cache context, plus the conv and
  recurrent states of Gated DeltaNet layers) carries every layer's past. The rows' common prompt prefix is
  forwarded once, then one token per row per forward: rows with longer prompts feed their remaining prompt tokens
  while shorter ones already generate (megatron-core's static engine does the same). Forwards go through the
  pipeline schedules like scoring; each stage caches its own layers. The cache lives for one batch. It serves
  without sequence parallelism (a one-token step cannot split over TP ranks; MoE models with TP > 1 need it):
  every family at TP 1 with any PP, EP and DP.
- full prefix: each step forwards every row's whole prefix through the pipeline schedules, so it runs at every
  layout, at O(length^2) compute.

Every rank of the job runs the same number of forwards of the same shapes (expert-parallel collectives span data-
parallel ranks), so widths and step counts are agreed over the world.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from typing import Any

import torch
import torch.distributed as dist

from megatron_slim.eval.metrics import vocab_parallel_argmax
from megatron_slim.models.forward import forward_rows, main_head_only, right_padded, tp_group
from megatron_slim.models.unwrap import unwrap_model
from megatron_slim.runtime.distributed import local_device, world_reduce


def kv_cache_blocker(model: torch.nn.Module) -> str | None:
    """Why the generation cache cannot serve `model` at the current layout; None when it can."""
    if unwrap_model(model).config.sequence_parallel:
        return "sequence parallelism (a one-token step cannot split over tensor-parallel ranks)"
    return None


def greedy_steps(model: torch.nn.Module, prompts: list[list[int]], micro_batch: int, max_new: int, *,
                 kv_cache: bool = True) -> Iterator[tuple[list[int], list[bool]]]:
    """Per forward step, (next greedy token of every row, whether that token continues the row's generation);
    False while a row is still feeding its own prompt (the cached path). Each row continues its prompt with its
    own earlier tokens; the same lists on every rank. Collective: every rank must stop iterating after the same
    step (agree over the world before breaking); a row never gets more than `max_new` fresh tokens. `kv_cache`
    False forwards whole prefixes even where the cache serves (the baseline it is measured and tested against)."""
    if not prompts or any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if kv_cache and kv_cache_blocker(model) is None:
        yield from _cached_steps(model, prompts, micro_batch, max_new)
    else:
        yield from _full_prefix_steps(model, prompts, micro_batch, max_new)


def _next_tokens(model: torch.nn.Module, tokens: torch.Tensor, lengths: list[int], micro_batch: int,
                 context: Any = None) -> list[int]:
    """Greedy token after position lengths[r] - 1 of each row of `tokens` [B, S], on every rank (the last
    pipeline stage computes them, from the logits of that position only, then broadcasts over its pipeline
    group)."""
    from megatron.core import parallel_state as ps

    device, tp = local_device(), tp_group()
    last = torch.tensor(lengths, device=device)[:, None] - 1
    nxt = torch.zeros(len(tokens), dtype=torch.long, device=device)

    def on_logits(logits: torch.Tensor, rows: slice) -> None:
        nxt[rows] = vocab_parallel_argmax(logits[:, 0], tp)
    forward_rows(model, tokens.to(device), micro_batch, on_logits, inference_context=context, positions=last)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(nxt, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return nxt.tolist()


def _full_prefix_steps(model: torch.nn.Module, prompts: list[list[int]], micro_batch: int, max_new: int
                       ) -> Iterator[tuple[list[int], list[bool]]]:
    seqs = [list(p) for p in prompts]
    for _ in range(max_new):
        tokens = right_padded(seqs, world_reduce(max(map(len, seqs))))
        ids = _next_tokens(model, tokens, [len(s) for s in seqs], micro_batch)
        for s, token in zip(seqs, ids):
            s.append(token)
        yield ids, [True] * len(seqs)


def _cached_steps(model: torch.nn.Module, prompts: list[list[int]], micro_batch: int, max_new: int
                  ) -> Iterator[tuple[list[int], list[bool]]]:
    from megatron_slim.models.gdn import GenerationContext

    batch = len(prompts)
    start = world_reduce(min(map(len, prompts)), dist.ReduceOp.MIN)  # the prefill width, equal on every rank
    context = GenerationContext(batch, world_reduce(max(map(len, prompts))) + max_new)
    fed = [p[:start] for p in prompts]  # what each row has fed so far; grows by one token per step

    def forward(tokens: list[list[int]]) -> list[int]:
        """Next token after `tokens` [batch, width], which continue the cached rows at the context's offset."""
        ids = _next_tokens(model, torch.tensor(tokens, dtype=torch.long), [len(tokens[0])] * batch, micro_batch,
                           context)
        context.sequence_len_offset += len(tokens[0])
        return ids

    with torch.no_grad(), main_head_only(unwrap_model(model)):
        ids = forward(fed)
        while True:  # a row's token is its (len(fed) - len(prompt) + 1)-th generated one once its prompt is fed
            yield ids, [len(p) <= len(f) < len(p) + max_new for f, p in zip(fed, prompts)]
            step = [p[len(f)] if len(f) < len(p) else ids[r] for r, (f, p) in enumerate(zip(fed, prompts))]
            for f, token in zip(fed, step):
                f.append(token)
            if context.sequence_len_offset >= context.max_sequence_length:
                return  # every row has its max_new tokens; callers agree to stop by then
            ids = forward([[token] for token in step])


def greedy_continuation(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int, micro_batch: int, *,
                        kv_cache: bool = True) -> torch.Tensor:
    """prompts [B, P] followed by `new_tokens` greedy tokens of the main head, [B, P + new_tokens], on every rank."""
    out: list[list[int]] = [[] for _ in range(len(prompts))]
    with closing(greedy_steps(model, prompts.tolist(), micro_batch, new_tokens, kv_cache=kv_cache)) as steps:
        for step, (ids, _) in enumerate(steps):  # equal prompt lengths: every step is fresh for every row
            for row, token in zip(out, ids):
                row.append(token)
            if step + 1 == new_tokens:
                break
    return torch.cat([prompts, torch.tensor(out, dtype=torch.long, device=prompts.device)], dim=1)
