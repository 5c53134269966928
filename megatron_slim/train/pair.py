"""A student stage and its frozen teacher stage that travel together through the pipeline.

With pipeline parallelism, teacher and student are split into the same number of stages; each stage's output on
the wire is [student hidden | teacher hidden] (the schedule's p2p shapes are widened accordingly), so the teacher's
activations reach the last stage along with the student's, where both heads' logits feed the loss. A teacher
built with MTP depths (loss.mtp_kd_source: mtp) runs its MTP block on the last stage, where megatron-core places
it, from the hidden states that arrived there; its per-depth logits are kept next to the main ones, so nothing
extra travels through the pipeline. Only the student is trainable: megatron-core's DDP and optimizer see only its
parameters, checkpoints hold only it.
"""
from __future__ import annotations

import torch

from megatron_slim.models.forward import mtp_logits_from_hidden


class DistillPair(torch.nn.Module):
    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.config = student.config
        self.teacher_logits: torch.Tensor | None = None
        self.teacher_mtp_logits: list[torch.Tensor] = []  # per depth, [b, S, V/tp]; last stage, MTP teachers only
        self._split = [student.config.hidden_size, teacher.config.hidden_size]

    def __getattr__(self, name: str):
        """megatron-core's schedules and grad finalisation look up model attributes (pre_process, model_type,
        shared embeddings, ...) on the module they are given: answer with the student's."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "student":
                raise
            return getattr(self.student, name)

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        if input_tensor is None:
            self.student.set_input_tensor(None)
            self.teacher.set_input_tensor(None)
            return
        student_in, teacher_in = torch.split(input_tensor, self._split, dim=-1)
        self.student.set_input_tensor(student_in)
        self.teacher.set_input_tensor(teacher_in.detach())

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor, attention_mask) -> torch.Tensor:
        out = self.student(tokens, position_ids, attention_mask)
        captured: list[torch.Tensor] = []
        hook = (self.teacher.mtp.register_forward_hook(lambda m, a, hidden: captured.append(hidden))
                if getattr(self.teacher, "mtp_process", False) else None)
        try:
            with torch.no_grad():
                teacher_out = self.teacher(tokens, position_ids, attention_mask)
                self.teacher_mtp_logits = mtp_logits_from_hidden(self.teacher, captured[0]) if captured else []
        finally:
            if hook is not None:
                hook.remove()
        if self.post_process:
            self.teacher_logits = teacher_out
            return out
        return torch.cat([out, teacher_out.detach()], dim=-1)

    def pipeline_shapes(self, recv_shapes: list, send_shapes: list) -> tuple[list, list]:
        """`adjust_tensor_shapes_fn` for megatron-core's pipeline schedule: widen the hidden dim of the p2p tensors."""
        width = sum(self._split)
        return ([(s, b, width) for s, b, _ in recv_shapes], [(s, b, width) for s, b, _ in send_shapes])

    # Checkpoints and state hold the student only.
    def sharded_state_dict(self, *args, **kwargs):
        return self.student.sharded_state_dict(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        return self.student.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.student.load_state_dict(state_dict, strict=strict)
