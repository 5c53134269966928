"""The training objective, plain or distilled, as a megatron-core forward step: the loop stays generic.

    total = alpha * KD + (1 - alpha) * LM + w_mtp_lm * mean_k MTP-LM_k + w_mtp_kd * mean_k MTP-KD_k
(MoE auxiliary losses are added inside the model by megatron-core). MTP-KD_k distils the student's MTP depth k at
position t toward the teacher's main head at t+k (mtp_kd_source: main) or toward the teacher's own MTP depth k at
t (mtp). Every term is computed by `megatron_slim.distill.losses` on vocab-parallel logits (never gathered).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from megatron_slim.distill.losses import kd_loss, lm_loss, mtp_kd_loss
from megatron_slim.models.forward import mtp_logits_from_hidden, position_ids_for
from megatron_slim.models.unwrap import unwrap_model
from megatron_slim.runtime.distributed import local_device

LossFunc = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
ForwardStep = Callable[[Iterator[dict[str, torch.Tensor]], torch.nn.Module], tuple[torch.Tensor, LossFunc]]


@dataclass
class Objective:
    """The objective's weights and divergences (the run config's `loss` section extends it)."""
    kd_weight: float = 0.5  # alpha: total = alpha * KD + (1 - alpha) * LM (+ MTP terms + MoE aux)
    kd_kind: str = "fkl"  # fkl | rkl | jsd
    temperature: float = 1.0
    mtp_lm_weight: float = 0.1
    mtp_kd_weight: float = 0.1  # student MTP depth k distilled toward the teacher distribution chosen below
    # main: the teacher's main head at position t+k (predicts the same token); mtp: the teacher's own MTP depth k
    # at position t (the teacher needs at least as many MTP depths as the student)
    mtp_kd_source: str = "main"


def forward_step(objective: Objective, student: torch.nn.Module, tp_group: dist.ProcessGroup | None,
                 distilled: bool) -> ForwardStep:
    """megatron-core's `forward_step_func` for training `student` (the bare model) through the module the schedule
    passes in: DDP around the student, or around a pair holding the frozen teacher when `distilled`, whose
    `teacher_logits` / `teacher_mtp_logits` hold the teacher's outputs of the same micro-batch on the last stage.
    The loss function returns the total and each term, detached, for the step's record."""

    def step(data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module
             ) -> tuple[torch.Tensor, LossFunc]:
        batch = next(data_iterator)
        dev = local_device()
        tokens, labels = batch["tokens"].to(dev), batch["labels"].to(dev)
        loss_mask = batch["loss_mask"].to(dev).float()
        captured: list[torch.Tensor] = []
        hook = (student.mtp.register_forward_hook(lambda m, a, out: captured.append(out))
                if getattr(student, "mtp_process", False) else None)
        try:
            output = model(tokens, position_ids_for(tokens), None)
        finally:
            if hook is not None:
                hook.remove()
        pair = unwrap_model(model) if distilled else None
        teacher_logits = pair.teacher_logits if pair is not None else None
        teacher_mtp = pair.teacher_mtp_logits if pair is not None else []
        c = objective

        def loss_func(logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            lm = lm_loss(logits, labels, loss_mask, tp_group=tp_group)
            parts = {"lm": lm}
            total = (1.0 - c.kd_weight) * lm
            if teacher_logits is not None and c.kd_weight > 0:
                parts["kd"] = kd_loss(logits, teacher_logits, kind=c.kd_kind, temperature=c.temperature,
                                      loss_mask=loss_mask, tp_group=tp_group)
                total = total + c.kd_weight * parts["kd"]
            if captured:
                depths = mtp_logits_from_hidden(student, captured[0])
                mtp_lm = sum(lm_loss(lg[:, :-k], labels[:, k:], loss_mask[:, k:], tp_group=tp_group)
                             for k, lg in enumerate(depths, start=1)) / len(depths)
                parts["mtp_lm"] = mtp_lm
                total = total + c.mtp_lm_weight * mtp_lm
                if teacher_logits is not None and c.mtp_kd_weight > 0:
                    targets = teacher_mtp if c.mtp_kd_source == "mtp" else [teacher_logits] * len(depths)
                    mtp_kd = sum(mtp_kd_loss(lg, target, k, loss_mask, source=c.mtp_kd_source, kind=c.kd_kind,
                                             temperature=c.temperature, tp_group=tp_group)
                                 for k, (lg, target) in enumerate(zip(depths, targets, strict=True), start=1)
                                 ) / len(depths)
                    parts["mtp_kd"] = mtp_kd
                    total = total + c.mtp_kd_weight * mtp_kd
            parts["loss"] = total
            # clone: the schedule scales the returned loss in place by 1/num_microbatches
            return total, {k: v.detach().float().clone() for k, v in parts.items()}

        return output, loss_func

    return step
