"""Distillation losses against a plain float64 reference (full softmax, autograd), on one process and TP=2."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_slim.distill.losses import KD_KINDS, kd_loss, lm_loss, mtp_kd_loss, mtp_kd_targets
from support.dist import run_distributed

B, S, V = 3, 7, 26
TEMPERATURE = 2.5


def _logits(seed: int, dtype: torch.dtype = torch.float64, shape: tuple[int, ...] = (B, S, V)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (3.0 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def _mask(seed: int, shape: tuple[int, ...] = (B, S)) -> torch.Tensor:
    mask = (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.35).to(torch.float64)
    mask.view(-1)[:2] = torch.tensor([1.0, 0.0])  # at least one kept and one dropped token
    return mask


def ref_divergence(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    """Per-token divergence written out from the definitions, full vocabulary, float64."""
    q = torch.softmax(student.double() / temperature, dim=-1)
    p = torch.softmax(teacher.double() / temperature, dim=-1)
    if kind == "fkl":
        return (p * (p.log() - q.log())).sum(-1)
    if kind == "rkl":
        return (q * (q.log() - p.log())).sum(-1)
    m = 0.5 * (p + q)
    return 0.5 * (p * (p.log() - m.log())).sum(-1) + 0.5 * (q * (q.log() - m.log())).sum(-1)


def ref_kd(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float,
           mask: torch.Tensor) -> torch.Tensor:
    per_token = ref_divergence(student, teacher, kind, temperature)
    return temperature ** 2 * (per_token * mask).sum() / mask.sum()


def ref_lm(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = -logp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    return (nll * mask).sum() / mask.sum()


def ref_mtp(student: torch.Tensor, teacher: torch.Tensor, k: int, mask: torch.Tensor, kind: str,
            temperature: float) -> torch.Tensor:
    """[batch, seq, vocab]: student position t against teacher position t+k, with the mask of t+k."""
    return ref_kd(student[:, :-k], teacher[:, k:], kind, temperature, mask[:, k:])


def ref_mtp_from_mtp(student: torch.Tensor, teacher_depth_k: torch.Tensor, k: int, mask: torch.Tensor, kind: str,
                     temperature: float) -> torch.Tensor:
    """[batch, seq, vocab]: student depth k at t against the teacher's depth k at t, with the mask of t+k."""
    return ref_kd(student[:, :-k], teacher_depth_k[:, :-k], kind, temperature, mask[:, k:])


def _grad(loss_fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss value and the gradient of 3*loss (a non-unit upstream gradient) w.r.t. the inputs."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    loss = loss_fn(*leaves)
    (3.0 * loss).backward()
    return loss.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("kind", KD_KINDS)
def test_kd_matches_float64_reference(kind: str) -> None:
    student, teacher, mask = _logits(0), _logits(1), _mask(2)
    teacher_leaf = teacher.clone().requires_grad_()
    loss, (grad,) = _grad(lambda s: kd_loss(s, teacher_leaf, kind=kind, temperature=TEMPERATURE, loss_mask=mask,
                                            chunk_tokens=4), student)
    ref, (ref_grad,) = _grad(lambda s: ref_kd(s, teacher, kind, TEMPERATURE, mask), student)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
    assert teacher_leaf.grad is None
    assert loss > 1e-3  # a non-degenerate case


@pytest.mark.parametrize("kind", KD_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kd_low_precision_inputs_compute_in_fp32(kind: str, dtype: torch.dtype) -> None:
    student, teacher, mask = _logits(3, dtype), _logits(4, dtype), _mask(5)
    loss, (grad,) = _grad(lambda s: kd_loss(s, teacher, kind=kind, temperature=TEMPERATURE, loss_mask=mask),
                          student)
    # The reference sees the same (rounded) input values; only the internal arithmetic differs.
    ref, (ref_grad,) = _grad(lambda s: ref_kd(s, teacher, kind, TEMPERATURE, mask), student.double())
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    # fp32 gradient: fp32 rounding; bf16 gradient: only the final cast to bf16 (8 mantissa bits).
    # Elementwise relative error is ill-posed where a gradient entry is ~0 (rkl/jsd subtract nearly equal log
    # ratios), so the absolute tolerance scales with the largest entry.
    rtol = 1e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=rtol * ref_grad.abs().max().item())


def test_lm_loss_matches_float64_reference() -> None:
    logits, mask = _logits(6), _mask(7)
    labels = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(8))
    labels[mask == 0] = -100  # ignore-index style labels on dropped tokens must not matter
    loss, (grad,) = _grad(lambda x: lm_loss(x, labels, mask, chunk_tokens=4), logits)
    ref, (ref_grad,) = _grad(lambda x: ref_lm(x, labels, mask), logits)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)


def test_no_mask_means_mean_over_all_tokens() -> None:
    student, teacher = _logits(9), _logits(10)
    loss = kd_loss(student, teacher, kind="jsd")
    torch.testing.assert_close(loss, ref_divergence(student, teacher, "jsd", 1.0).mean(), rtol=1e-12, atol=0)


def test_all_tokens_masked_gives_zero_loss_and_grad() -> None:
    student, teacher, mask = _logits(30), _logits(31), torch.zeros(B, S)
    loss, (grad,) = _grad(lambda s: kd_loss(s, teacher, kind="rkl", loss_mask=mask), student)
    lm, (lm_grad,) = _grad(lambda x: lm_loss(x, torch.zeros(B, S, dtype=torch.long), mask), student)
    assert loss == 0 and lm == 0  # not 0/0 = NaN
    assert torch.count_nonzero(grad) == 0 and torch.count_nonzero(lm_grad) == 0


@pytest.mark.parametrize("kind", [*KD_KINDS, "lm"])
def test_chunk_size_does_not_change_results(kind: str) -> None:
    student, teacher, mask = _logits(11, torch.float32), _logits(12, torch.float32), _mask(13)
    labels = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(14))

    def run(chunk: int | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if kind == "lm":
            return _grad(lambda x: lm_loss(x, labels, mask, chunk_tokens=chunk), student)
        return _grad(lambda s: kd_loss(s, teacher, kind=kind, temperature=TEMPERATURE, loss_mask=mask,
                                       chunk_tokens=chunk), student)

    loss, (grad,) = run(None)  # one chunk
    for chunk in (1, 2, 5):
        chunk_loss, (chunk_grad,) = run(chunk)
        assert torch.equal(chunk_loss, loss), chunk
        assert torch.equal(chunk_grad, grad), chunk


@pytest.mark.parametrize("kind", [*KD_KINDS, "lm", "mtp"])
def test_masked_tokens_do_not_contribute(kind: str) -> None:
    student, teacher, mask = _logits(15), _logits(16), _mask(17)
    labels = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(18))
    dropped = mask == 0
    # Garbage (huge values, NaN, out-of-range labels) wherever the mask drops a token.
    student2, teacher2, labels2 = student.clone(), teacher.clone(), labels.clone()
    student2[dropped] = 1e4 * _logits(19)[dropped]
    student2[tuple(dropped.nonzero()[0])] = float("nan")
    teacher2[dropped] = -1e4 * _logits(20)[dropped]
    labels2[dropped] = -100
    mtp_mask = torch.zeros_like(mask)
    mtp_mask[:, 2:] = mask[:, 2:]  # MTP k=2 uses the mask of position t+2: student rows t with mask[t+2] == 0 drop
    mtp_dropped = torch.nn.functional.pad(mtp_mask[:, 2:], (0, 2)) == 0
    student3 = student.clone()
    student3[mtp_dropped] = float("nan")
    teacher3 = teacher.clone()
    teacher3[mtp_mask == 0] = float("nan")

    def run(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if kind == "lm":
            return _grad(lambda x: lm_loss(x, y, mask), s)
        if kind == "mtp":
            return _grad(lambda x: mtp_kd_loss(x, t, 2, mtp_mask, temperature=TEMPERATURE), s)
        return _grad(lambda x: kd_loss(x, t, kind=kind, temperature=TEMPERATURE, loss_mask=mask), s)

    loss, (grad,) = run(student, teacher, labels)
    if kind == "mtp":
        loss2, (grad2,) = run(student3, teacher3, labels)
        dropped = mtp_dropped
    else:
        loss2, (grad2,) = run(student2, teacher2, labels2)
    assert torch.isfinite(loss) and loss > 0
    assert torch.equal(loss, loss2)
    assert torch.equal(grad, grad2)
    assert torch.count_nonzero(grad[dropped]) == 0 and torch.count_nonzero(grad[~dropped]) > 0


def test_mtp_targets_pair_position_t_with_teacher_t_plus_k() -> None:
    # One sequence of 5 tokens, depth 2: student rows 0..2 -> teacher rows 2..4, weights = mask at 2..4.
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0]])
    pairs = mtp_kd_targets(torch.zeros(1, 5, 4), 2, mask)
    assert pairs.student_rows.tolist() == [0, 2]
    assert pairs.teacher_rows.tolist() == [2, 4]
    # [seq, batch] layout: token (s, b) is row s*batch + b.
    pairs = mtp_kd_targets(torch.zeros(4, 2, 3), 1, seq_dim=0)
    assert pairs.student_rows.tolist() == [0, 1, 2, 3, 4, 5]
    assert pairs.teacher_rows.tolist() == [2, 3, 4, 5, 6, 7]


def test_mtp_source_targets_pair_position_t_with_teacher_depth_k_at_t() -> None:
    # Depth 2 from the teacher's own depth-2 head: student rows 0..2 -> teacher rows 0..2, weights = mask at 2..4.
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.5]])
    pairs = mtp_kd_targets(torch.zeros(1, 5, 4), 2, mask, source="mtp")
    assert pairs.student_rows.tolist() == [0, 2]
    assert pairs.teacher_rows.tolist() == [0, 2]
    assert pairs.weights.tolist() == [1.0, 0.5]
    pairs = mtp_kd_targets(torch.zeros(4, 2, 3), 1, seq_dim=0, source="mtp")
    assert pairs.student_rows.tolist() == pairs.teacher_rows.tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="source"):
        mtp_kd_targets(torch.zeros(1, 5, 4), 1, source="next")


@pytest.mark.parametrize("kind", KD_KINDS)
@pytest.mark.parametrize("k", [1, 2])
def test_mtp_source_targets_are_the_teacher_depth_k_logits_at_t(kind: str, k: int) -> None:
    """The student's depth-k logits copied from the teacher's depth-k logits at the same positions give zero loss
    (only positions whose target t+k is inside the sequence count); any shift, or the other depth, does not."""
    teacher_depths = [_logits(40), _logits(41)]
    student = _logits(42)
    student[:, : S - k] = teacher_depths[k - 1][:, : S - k]
    assert mtp_kd_loss(student, teacher_depths[k - 1], k, source="mtp", kind=kind, temperature=TEMPERATURE) < 1e-12
    assert mtp_kd_loss(student, teacher_depths[2 - k], k, source="mtp", kind=kind, temperature=TEMPERATURE) > 1e-2
    assert mtp_kd_loss(student, teacher_depths[k - 1], k, source="main", kind=kind, temperature=TEMPERATURE) > 1e-2


@pytest.mark.parametrize("kind", KD_KINDS)
def test_mtp_source_matches_reference_in_both_layouts(kind: str) -> None:
    student, teacher, mask, k = _logits(43), _logits(44), _mask(45), 2
    loss, (grad,) = _grad(lambda s: mtp_kd_loss(s, teacher, k, mask, source="mtp", kind=kind,
                                                 temperature=TEMPERATURE, chunk_tokens=3), student)
    ref, (ref_grad,) = _grad(lambda s: ref_mtp_from_mtp(s, teacher, k, mask, kind, TEMPERATURE), student)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
    assert torch.count_nonzero(grad[:, S - k:]) == 0
    loss_sb, (grad_sb,) = _grad(lambda s: mtp_kd_loss(s, teacher.transpose(0, 1).contiguous(), k, mask.T,
                                                      source="mtp", kind=kind, temperature=TEMPERATURE, seq_dim=0),
                                student.transpose(0, 1).contiguous())
    torch.testing.assert_close(loss_sb, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_sb.transpose(0, 1), ref_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", KD_KINDS)
@pytest.mark.parametrize("k", [1, 2])
def test_mtp_only_the_right_shift_matches(kind: str, k: int) -> None:
    teacher = _logits(21)
    student = _logits(22)
    student[:, : S - k] = teacher[:, k:]  # depth k at t is built from the teacher main head at t+k
    assert mtp_kd_loss(student, teacher, k, kind=kind, temperature=TEMPERATURE) < 1e-12
    for wrong in (k - 1, k + 1):
        if wrong >= 1:
            assert mtp_kd_loss(student, teacher, wrong, kind=kind, temperature=TEMPERATURE) > 1e-2
    assert kd_loss(student, teacher, kind=kind, temperature=TEMPERATURE) > 1e-2  # no shift at all


@pytest.mark.parametrize("kind", KD_KINDS)
def test_mtp_matches_reference_in_both_layouts(kind: str) -> None:
    student, teacher, mask, k = _logits(23), _logits(24), _mask(25), 2
    loss, (grad,) = _grad(lambda s: mtp_kd_loss(s, teacher, k, mask, kind=kind, temperature=TEMPERATURE,
                                                 chunk_tokens=3), student)
    ref, (ref_grad,) = _grad(lambda s: ref_mtp(s, teacher, k, mask, kind, TEMPERATURE), student)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
    assert torch.count_nonzero(grad[:, S - k:]) == 0  # no partner beyond the sequence
    # Megatron's [seq, batch, vocab] layout with seq_dim=0 gives the same loss and the transposed gradient.
    loss_sb, (grad_sb,) = _grad(lambda s: mtp_kd_loss(s, teacher.transpose(0, 1).contiguous(), k, mask.T, kind=kind,
                                                      temperature=TEMPERATURE, seq_dim=0),
                                student.transpose(0, 1).contiguous())
    torch.testing.assert_close(loss_sb, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_sb.transpose(0, 1), ref_grad, rtol=1e-10, atol=1e-14)


def _tp_worker(rank: int, world_size: int, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
               labels: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Each rank sees only its contiguous vocab shard; returns {case: [loss, grad shard]}."""
    shard = V // world_size
    group = dist.group.WORLD
    results: dict[str, list[torch.Tensor]] = {}
    for dtype in (torch.float64, torch.float32):
        s = student[..., rank * shard:(rank + 1) * shard].to(dtype)
        t = teacher[..., rank * shard:(rank + 1) * shard].to(dtype)
        cases = {f"lm/{dtype}": lambda x: lm_loss(x, labels, mask, group, chunk_tokens=4)}
        for kind in KD_KINDS:
            cases[f"{kind}/{dtype}"] = lambda x, kind=kind: kd_loss(
                x, t, kind=kind, temperature=TEMPERATURE, loss_mask=mask, tp_group=group, chunk_tokens=4)
            cases[f"mtp-{kind}/{dtype}"] = lambda x, kind=kind: mtp_kd_loss(
                x, t, 2, mask, kind=kind, temperature=TEMPERATURE, tp_group=group, chunk_tokens=4)
            cases[f"mtp-src-{kind}/{dtype}"] = lambda x, kind=kind: mtp_kd_loss(
                x, t, 2, mask, source="mtp", kind=kind, temperature=TEMPERATURE, tp_group=group, chunk_tokens=4)
        for name, fn in cases.items():
            loss, (grad,) = _grad(fn, s)
            results[name] = [loss, grad]
    return results


def test_tensor_parallel_2_ranks_match_reference() -> None:
    student, teacher, mask = _logits(26), _logits(27), _mask(28)
    labels = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(29))
    ranks = run_distributed(_tp_worker, 2, student, teacher, mask, labels)
    refs = {"lm": lambda x: ref_lm(x, labels, mask)}
    for kind in KD_KINDS:
        refs[kind] = lambda x, kind=kind: ref_kd(x, teacher, kind, TEMPERATURE, mask)
        refs[f"mtp-{kind}"] = lambda x, kind=kind: ref_mtp(x, teacher, 2, mask, kind, TEMPERATURE)
        refs[f"mtp-src-{kind}"] = lambda x, kind=kind: ref_mtp_from_mtp(x, teacher, 2, mask, kind, TEMPERATURE)
    assert len(ranks[0]) == 2 * len(refs)
    for name, ref_fn in refs.items():
        ref, (ref_grad,) = _grad(ref_fn, student)
        for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
            atol = rtol * ref_grad.abs().max().item()  # see test_kd_low_precision_inputs_compute_in_fp32
            (loss0, grad0), (loss1, grad1) = ranks[0][f"{name}/{dtype}"], ranks[1][f"{name}/{dtype}"]
            assert torch.equal(loss0, loss1), name
            torch.testing.assert_close(loss0.double(), ref, rtol=rtol, atol=0,
                                       msg=lambda m, name=name, dtype=dtype: f"{name} {dtype}: {m}")
            torch.testing.assert_close(torch.cat([grad0, grad1], dim=-1).double(), ref_grad, rtol=rtol, atol=atol,
                                       msg=lambda m, name=name, dtype=dtype: f"{name} {dtype}: {m}")
