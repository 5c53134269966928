"""Distillation and language-model losses on vocab-parallel logits, chunked over tokens.

Layout: every logits tensor is this rank's vocabulary shard, shape [..., V/tp], in megatron-core's vocab-parallel
layout (tensor-parallel rank r holds the contiguous vocabulary slice [r*V/tp, (r+1)*V/tp)). `tp_group=None` means
no tensor parallelism. The full vocabulary is never gathered: softmax maxima and normalisers and the per-token
divergence sums are all-reduced over `tp_group`, so every rank of the group must pass the same loss mask.

Memory: the forward keeps only a few floats per kept token. The backward recomputes both softmaxes chunk by chunk
from the saved per-token log-normalisers and writes the analytic gradient straight into one tensor shaped like
the student logits, so the peak extra memory is that gradient plus a few fp32 buffers of `chunk_tokens x V/tp`,
whatever the sequence length. Chunks are computed in fp32 (fp64 for fp64 inputs). Masked tokens are skipped, not
multiplied by zero: their logits never enter the arithmetic and their gradient is exactly zero.

Logits must be finite (a -inf teacher logit would give 0 * inf in the KL sums).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

KDKind = Literal["fkl", "rkl", "jsd"]
KD_KINDS: tuple[str, ...] = ("fkl", "rkl", "jsd")
MTPKDSource = Literal["main", "mtp"]
MTP_KD_SOURCES: tuple[str, ...] = ("main", "mtp")
# Elements in one fp32 chunk buffer when `chunk_tokens` is None; at most four are alive at once. On CPU 16 MiB
# stays under glibc's largest mmap threshold, so freed buffers are reused instead of being mapped and page-faulted
# afresh for every chunk (which cost more time than the arithmetic); accelerators get fewer, larger chunks (fewer
# all-reduces and kernel launches).
_CPU_CHUNK_ELEMENTS = 1 << 22
_ACCELERATOR_CHUNK_ELEMENTS = 1 << 25
_LN2 = math.log(2.0)


@dataclass(frozen=True)
class KDPairs:
    """Flat token rows of the student paired with the teacher rows they are distilled toward, with weights.

    Rows index the logits flattened to [tokens, V/tp]; only pairs with a nonzero weight are listed.
    """

    student_rows: Tensor
    teacher_rows: Tensor
    weights: Tensor


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    kind: KDKind = "fkl",
    temperature: float = 1.0,
    loss_mask: Tensor | None = None,
    tp_group: dist.ProcessGroup | None = None,
    chunk_tokens: int | None = None,
) -> Tensor:
    """Mean over kept tokens of a per-token divergence between teacher and student distributions.

    kind: "fkl" = KL(teacher || student) (mode covering), "rkl" = KL(student || teacher) (mode seeking),
    "jsd" = 0.5*KL(teacher || M) + 0.5*KL(student || M) with M the 50/50 mixture (bounded by ln 2).
    Both distributions are softmax(logits / temperature) and the loss is multiplied by temperature**2 (Hinton et
    al.), which keeps gradient magnitudes comparable across temperatures.
    loss_mask: shape logits.shape[:-1]; 1 keeps a token, 0 drops it (other values weight it); the mean divides by
    the mask's sum (0 when nothing is kept). Only the student receives a gradient.
    chunk_tokens: tokens per chunk; None gives fp32 buffers of about 16 MiB on CPU and 128 MiB on accelerators.
    """
    _check_pair(student_logits, teacher_logits)
    pairs = _kept_rows(student_logits.shape[:-1], loss_mask, student_logits.device)
    return kd_pairs_loss(student_logits, teacher_logits, pairs, kind=kind, temperature=temperature,
                         tp_group=tp_group, chunk_tokens=chunk_tokens)


def mtp_kd_targets(teacher_logits: Tensor, k: int, loss_mask: Tensor | None = None, *, seq_dim: int = 1,
                   source: MTPKDSource = "main") -> KDPairs:
    """Pair the student's MTP depth-k positions with the teacher positions that predict the same token.

    MTP depth k (k=1 is the first MTP head) at position t predicts token t+k+1. source="main": the teacher's main
    head predicts that token at position t+k, so student positions [0, S-k) pair with teacher positions [k, S).
    source="mtp": `teacher_logits` are the teacher's own depth-k logits, which predict it at the same position t,
    so student positions [0, S-k) pair with teacher positions [0, S-k). Either way the last k student positions
    predict past the sequence and are dropped, and each pair uses the loss mask of its target position t+k.
    Layout [batch, seq, V/tp] by default; pass seq_dim=0 for megatron's [seq, batch, V/tp]. Only the teacher's
    shape and device are used; the student MTP logits must have the same shape.
    """
    if k < 1:
        raise ValueError(f"MTP depth k must be >= 1, got {k}")
    if source not in MTP_KD_SOURCES:
        raise ValueError(f"source must be one of {MTP_KD_SOURCES}, got {source!r}")
    token_shape = teacher_logits.shape[:-1]
    seq_dim = _token_dim(seq_dim, teacher_logits.dim())
    _check_mask(loss_mask, token_shape)
    tokens = torch.arange(math.prod(token_shape), device=teacher_logits.device).view(token_shape)
    span = max(token_shape[seq_dim] - k, 0)
    student_rows = tokens.narrow(seq_dim, 0, span).reshape(-1)
    shift = token_shape[seq_dim] - span if source == "main" else 0
    teacher_rows = tokens.narrow(seq_dim, shift, span).reshape(-1)
    if loss_mask is None:
        return KDPairs(student_rows, teacher_rows, torch.ones(student_rows.numel(), device=student_rows.device))
    weights = loss_mask.to(teacher_logits.device).narrow(seq_dim, token_shape[seq_dim] - span, span).reshape(-1)
    keep = weights != 0
    return KDPairs(student_rows[keep], teacher_rows[keep], weights[keep])


def mtp_kd_loss(
    student_mtp_logits: Tensor,
    teacher_logits: Tensor,
    k: int,
    loss_mask: Tensor | None = None,
    *,
    source: MTPKDSource = "main",
    kind: KDKind = "fkl",
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    chunk_tokens: int | None = None,
    seq_dim: int = 1,
) -> Tensor:
    """`kd_loss` of the student's MTP depth-k logits toward `teacher_logits`: the teacher's main head shifted by k
    (source="main") or the teacher's own depth-k head at the same positions (source="mtp"); see mtp_kd_targets.

    loss_mask is the unshifted per-position mask of the sequence; it is shifted here.
    """
    _check_pair(student_mtp_logits, teacher_logits)
    pairs = mtp_kd_targets(teacher_logits, k, loss_mask, seq_dim=seq_dim, source=source)
    return kd_pairs_loss(student_mtp_logits, teacher_logits, pairs, kind=kind, temperature=temperature,
                         tp_group=tp_group, chunk_tokens=chunk_tokens)


def kd_pairs_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    pairs: KDPairs,
    *,
    kind: KDKind = "fkl",
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    chunk_tokens: int | None = None,
) -> Tensor:
    """`kd_loss` over explicit (student row, teacher row, weight) pairs: the weighted mean of the divergences."""
    if kind not in KD_KINDS:
        raise ValueError(f"kind must be one of {KD_KINDS}, got {kind!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab = student_logits.shape[-1]
    return _KDLoss.apply(student_logits.reshape(-1, vocab), teacher_logits.detach().reshape(-1, vocab),
                         pairs.student_rows, pairs.teacher_rows, pairs.weights, kind, float(temperature),
                         tp_group, _chunk(chunk_tokens, vocab, student_logits.device))


def lm_loss(
    logits: Tensor,
    labels: Tensor,
    loss_mask: Tensor | None = None,
    tp_group: dist.ProcessGroup | None = None,
    *,
    chunk_tokens: int | None = None,
) -> Tensor:
    """Vocab-parallel cross entropy, mean over kept tokens (labels are global vocabulary ids, shape logits[:-1])."""
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} != logits token shape {tuple(logits.shape[:-1])}")
    pairs = _kept_rows(logits.shape[:-1], loss_mask, logits.device)
    vocab = logits.shape[-1]
    kept_labels = labels.reshape(-1).to(logits.device)[pairs.student_rows]
    return _VocabParallelCE.apply(logits.reshape(-1, vocab), pairs.student_rows, kept_labels, pairs.weights,
                                  tp_group, _chunk(chunk_tokens, vocab, logits.device))


class _KDLoss(torch.autograd.Function):
    """Chunked divergence whose backward recomputes the softmaxes instead of keeping tokens x vocab activations."""

    @staticmethod
    def forward(ctx: FunctionCtx, student: Tensor, teacher: Tensor, student_rows: Tensor, teacher_rows: Tensor,
                weights: Tensor, kind: str, temperature: float, group: dist.ProcessGroup | None,
                chunk: int) -> Tensor:
        dtype = _compute_dtype(student, teacher)
        weights = weights.to(dtype)
        n = student_rows.numel()
        # Per kept token: student and teacher log-normalisers, the divergence, and the token sum the backward needs.
        lse = torch.empty(2, n, dtype=dtype, device=student.device)
        div = torch.empty(n, dtype=dtype, device=student.device)
        aux = torch.empty(n, dtype=dtype, device=student.device)
        for lo in range(0, n, chunk):
            rows = slice(lo, lo + chunk)
            logq = _gather_rows(student, student_rows[rows], dtype, temperature)
            logp = _gather_rows(teacher, teacher_rows[rows], dtype, temperature)
            lse[:, rows] = _log_softmax_pair_(logq, logp, group)
            sums = _all_reduce(_token_sums_(kind, logq, logp), dist.ReduceOp.SUM, group)
            del logq, logp
            if kind == "jsd":
                div[rows] = 0.5 * (sums[0] + sums[1])
                aux[rows] = 0.5 * sums[1]
            else:
                div[rows] = aux[rows] = sums[0]
        norm = weights.sum().clamp_min(torch.finfo(dtype).tiny)
        ctx.save_for_backward(student, teacher, student_rows, teacher_rows, weights, lse, aux, norm)
        ctx.kind, ctx.temperature, ctx.chunk = kind, temperature, chunk
        return temperature ** 2 * torch.dot(weights, div) / norm

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        student, teacher, student_rows, teacher_rows, weights, lse, aux, norm = ctx.saved_tensors
        temperature = ctx.temperature
        dtype = lse.dtype
        # d(T^2 * div)/d(logits) = T * d(div)/d(logits / T), weighted and normalised like the forward mean.
        coef = weights * (grad_out.to(dtype) * temperature / norm)
        grad = torch.zeros_like(student)
        for lo in range(0, student_rows.numel(), ctx.chunk):
            rows = slice(lo, lo + ctx.chunk)
            logq = _gather_rows(student, student_rows[rows], dtype, temperature).sub_(lse[0, rows, None])
            logp = _gather_rows(teacher, teacher_rows[rows], dtype, temperature).sub_(lse[1, rows, None])
            g = _student_grad_(ctx.kind, logq, logp, aux[rows]).mul_(coef[rows, None])
            grad.index_copy_(0, student_rows[rows], g.to(grad.dtype))
        return grad, None, None, None, None, None, None, None, None


class _VocabParallelCE(torch.autograd.Function):
    """Chunked cross entropy over a vocab shard; the backward recomputes softmax - onehot chunk by chunk."""

    @staticmethod
    def forward(ctx: FunctionCtx, logits: Tensor, rows: Tensor, labels: Tensor, weights: Tensor,
                group: dist.ProcessGroup | None, chunk: int) -> Tensor:
        dtype = _compute_dtype(logits, logits)
        weights = weights.to(dtype)
        local = labels - _vocab_start(logits.shape[-1], group)
        n = rows.numel()
        lse = torch.empty(n, dtype=dtype, device=logits.device)
        nll = torch.empty(n, dtype=dtype, device=logits.device)
        for lo in range(0, n, chunk):
            sl = slice(lo, lo + chunk)
            x = _gather_rows(logits, rows[sl], dtype, 1.0)
            shift = _all_reduce(x.amax(-1), dist.ReduceOp.MAX, group)
            x.sub_(shift[:, None])
            target = _local_pick(x, local[sl])
            sums = _all_reduce(torch.stack([x.exp_().sum(-1), target]), dist.ReduceOp.SUM, group)
            del x
            lse[sl] = shift + sums[0].log()
            nll[sl] = sums[0].log() - sums[1]
        norm = weights.sum().clamp_min(torch.finfo(dtype).tiny)
        ctx.save_for_backward(logits, rows, local, weights, lse, norm)
        ctx.chunk = chunk
        return torch.dot(weights, nll) / norm

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        logits, rows, local, weights, lse, norm = ctx.saved_tensors
        dtype = lse.dtype
        coef = weights * (grad_out.to(dtype) / norm)
        vocab = logits.shape[-1]
        grad = torch.zeros_like(logits)
        for lo in range(0, rows.numel(), ctx.chunk):
            sl = slice(lo, lo + ctx.chunk)
            probs = _gather_rows(logits, rows[sl], dtype, 1.0).sub_(lse[sl, None]).exp_()
            owned = (local[sl] >= 0) & (local[sl] < vocab)
            probs.scatter_add_(1, local[sl].clamp(0, vocab - 1)[:, None], -owned.to(dtype)[:, None])
            grad.index_copy_(0, rows[sl], probs.mul_(coef[sl, None]).to(grad.dtype))
        return grad, None, None, None, None, None


def _log_softmax_pair_(logq: Tensor, logp: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Turn two chunks of scaled logits into log-probabilities in place; returns their log-normalisers [2, c]."""
    shift = _all_reduce(torch.stack([logq.amax(-1), logp.amax(-1)]), dist.ReduceOp.MAX, group)
    logq.sub_(shift[0, :, None])
    logp.sub_(shift[1, :, None])
    log_z = _all_reduce(torch.stack([logq.exp().sum(-1), logp.exp().sum(-1)]), dist.ReduceOp.SUM, group).log_()
    logq.sub_(log_z[0, :, None])
    logp.sub_(log_z[1, :, None])
    return shift + log_z


def _token_sums_(kind: str, logq: Tensor, logp: Tensor) -> Tensor:
    """This shard's per-token divergence sums, [1, c] (fkl, rkl) or [KL(P||M), KL(Q||M)] (jsd); clobbers inputs.

    P is the teacher, Q the student and M their mixture.
    """
    if kind == "fkl":
        return logp.exp().mul_(logp.sub_(logq)).sum(-1)[None]
    if kind == "rkl":
        return logq.exp().mul_(logq.sub_(logp)).sum(-1)[None]
    log_m = _log_mixture(logq, logp)
    kl_pm = logp.exp().mul_(logp.sub_(log_m)).sum(-1)
    kl_qm = logq.exp().mul_(logq.sub_(log_m)).sum(-1)
    return torch.stack([kl_pm, kl_qm])


def _student_grad_(kind: str, logq: Tensor, logp: Tensor, aux: Tensor) -> Tensor:
    """d(divergence)/d(student logits / T) for one chunk of log-probabilities; clobbers the inputs.

    fkl: q - p. rkl: q * (log q - log p - KL(Q||P)). jsd: q * (g - sum(q*g)) with g = 0.5*log(q/m), whose
    token sum 0.5*KL(Q||M) the forward saved in `aux` (so the backward needs no communication).
    """
    if kind == "fkl":
        return logq.exp_().sub_(logp.exp_())
    if kind == "rkl":
        q = logq.exp()
        return logq.sub_(logp).sub_(aux[:, None]).mul_(q)
    log_m = _log_mixture(logq, logp)
    q = logq.exp()
    return logq.sub_(log_m).mul_(0.5).sub_(aux[:, None]).mul_(q)


def _log_mixture(logq: Tensor, logp: Tensor) -> Tensor:
    """log(0.5*q + 0.5*p) without underflow, from ops whose rounding does not depend on the tensor size.

    (torch.logaddexp rounds differently in its vectorised body and its tail on CPU, so results would change with
    the chunk size.)
    """
    log_m = torch.maximum(logq, logp)
    log_m.add_(torch.sub(logq, logp).abs_().neg_().exp_().log1p_())
    return log_m.sub_(_LN2)


def _local_pick(x: Tensor, local: Tensor) -> Tensor:
    """x[i, local[i]] where the label falls in this shard, else 0 (the all-reduce adds the owner's value)."""
    vocab = x.shape[-1]
    owned = (local >= 0) & (local < vocab)
    picked = x.gather(1, local.clamp(0, vocab - 1)[:, None]).squeeze(1)
    return torch.where(owned, picked, torch.zeros_like(picked))


def _gather_rows(x: Tensor, rows: Tensor, dtype: torch.dtype, temperature: float) -> Tensor:
    """A fresh compute-dtype copy of some rows, divided by the temperature (safe to modify in place)."""
    out = x.index_select(0, rows).to(dtype)
    return out.div_(temperature) if temperature != 1.0 else out


def _all_reduce(x: Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def _vocab_start(vocab_shard: int, group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group) * vocab_shard


def _compute_dtype(a: Tensor, b: Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)


def _chunk(chunk_tokens: int | None, vocab_shard: int, device: torch.device) -> int:
    if chunk_tokens is None:
        elements = _CPU_CHUNK_ELEMENTS if device.type == "cpu" else _ACCELERATOR_CHUNK_ELEMENTS
        return max(1, elements // max(vocab_shard, 1))
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return chunk_tokens


def _kept_rows(token_shape: torch.Size, loss_mask: Tensor | None, device: torch.device) -> KDPairs:
    """Rows (and weights) of the tokens the mask keeps; each token pairs with itself."""
    _check_mask(loss_mask, token_shape)
    if loss_mask is None:
        rows = torch.arange(math.prod(token_shape), device=device)
        return KDPairs(rows, rows, torch.ones(rows.numel(), device=device))
    flat = loss_mask.reshape(-1).to(device)
    rows = flat.nonzero().squeeze(1)
    return KDPairs(rows, rows, flat[rows])


def _check_pair(student: Tensor, teacher: Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")
    if not (student.is_floating_point() and teacher.is_floating_point()):
        raise TypeError("logits must be floating point")


def _check_mask(loss_mask: Tensor | None, token_shape: torch.Size) -> None:
    if loss_mask is not None and loss_mask.shape != token_shape:
        raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} != logits token shape {tuple(token_shape)}")


def _token_dim(seq_dim: int, logits_dim: int) -> int:
    """Normalise seq_dim (counted on the logits) and refuse the vocabulary dimension."""
    dim = seq_dim % logits_dim
    if dim == logits_dim - 1:
        raise ValueError("seq_dim must not be the vocabulary (last) dimension")
    return dim
