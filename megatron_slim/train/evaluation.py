"""Held-out evaluation along training (run config section `evaluation`): `<save_dir>/eval.jsonl`.

The student is evaluated on the same held-out windows (built once) at step 0 of a fresh run, after every step in
which the consumed tokens cross a multiple of `evaluation.every_tokens`, and after the last step, through
eval/heldout.py at the trainer's layout (forward only, no MTP acceptance). A record is appended before the
checkpoint of its step is saved, so every checkpoint's records are on disk; on resume the records after the
checkpoint's step are dropped first (those steps run again), and a killed and resumed run ends with exactly the
records of an uninterrupted one. Evaluating draws no random numbers and reads no training data, so training is the
same with and without it.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_slim.errors import UserError
from megatron_slim.models.config import ModelConfig
from megatron_slim.runtime.jsonl import read_jsonl
from megatron_slim.runtime.outputs import atomic_write
from megatron_slim.train.config import EvaluationSection

EVAL_LOG = "eval.jsonl"
RECORD_KEYS = ("step", "consumed_tokens", "loss", "loss_se", "ppl", "accuracy", "tokens", "window_losses")


def evaluation_due(step: int, last_step: int, tokens_per_step: int, every_tokens: float) -> bool:
    """Whether to evaluate after step `step` (>= 1): it took the consumed tokens past a multiple of `every_tokens`,
    or it is the last step (once, also when both hold)."""
    crossed = step * tokens_per_step // every_tokens > (step - 1) * tokens_per_step // every_tokens
    return crossed or step == last_step


def keep_records_up_to(path: Path, step: int | None) -> None:
    """Atomically rewrite eval.jsonl with only the records of steps <= `step` (None: no record, a fresh run)."""
    if not path.is_file():
        return
    kept = [r for r in read_jsonl(path) if step is not None and r["step"] <= step]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))


class HeldOutEvaluation:
    """The held-out windows of a run and the evaluations along its training."""

    def __init__(self, section: EvaluationSection, seq_length: int, student_checkpoint: Path, cfg: ModelConfig,
                 save_dir: Path) -> None:
        """Read the windows on every rank (collective-free): the first ceil(tokens / seq_length) windows of the
        EOS-joined documents, the EOS and tokenizer being the student checkpoint's, as `megatron-slim evaluate`
        reads them (so the last record matches evaluating the final checkpoint on the same data)."""
        from megatron_slim.checkpoint.files import Checkpoint
        from megatron_slim.data.calibration import calibration_windows, check_source, eos_token_id

        self.section, self.cfg = section, cfg
        self.path = save_dir / EVAL_LOG
        try:
            check_source(section.data)
        except FileNotFoundError as e:
            raise UserError(f"evaluation.data: {e}") from None
        tokenizer_dir = Checkpoint(student_checkpoint, "mcore").tokenizer_dir
        eos = eos_token_id(cfg.hf_config, tokenizer_dir)
        wanted = math.ceil(section.tokens / seq_length)
        self.windows = calibration_windows(section.data, seq_length, wanted, eos, tokenizer_dir, cfg.vocab_size)
        if len(self.windows) == 0:
            raise UserError(f"evaluation.data {section.data} holds fewer than {seq_length} tokens: not one window")
        if len(self.windows) < wanted and dist.get_rank() == 0:
            print(f"warning: evaluation.data {section.data} runs out after {len(self.windows) * seq_length} tokens "
                  f"(of {wanted * seq_length})", file=sys.stderr, flush=True)

    def run(self, student: torch.nn.Module, step: int, consumed_tokens: int, write: bool) -> dict[str, Any]:
        """Collective: evaluate the bare (unwrapped) student, restore its training mode, append the record when
        `write` (one rank), print one line on rank 0; returns the record."""
        from megatron_slim.eval.heldout import evaluate

        training = student.training
        result = evaluate(student, self.cfg, self.windows, self.section.micro_batch, mtp_k=0)  # sets eval mode
        student.train(training)
        record = {"step": step, "consumed_tokens": consumed_tokens} | {k: result[k] for k in RECORD_KEYS[2:]}
        if write:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if dist.get_rank() == 0:
            print(f"eval   step {step:>6}  after {consumed_tokens:,} tokens: held-out loss {record['loss']:.4f} ± "
                  f"{record['loss_se']:.4f}  ppl {record['ppl']:.4g}  acc {record['accuracy'] * 100:.2f}%  "
                  f"({record['tokens']:,} tokens)", flush=True)
        return record
