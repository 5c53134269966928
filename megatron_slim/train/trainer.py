"""The training / online-distillation loop on Megatron-Core.

Student: HybridModel wrapped in megatron-core DDP with the distributed optimizer; micro-batches and gradient
accumulation (and pipeline schedules when pp > 1) through `get_forward_backward_func`. Teacher (optional): built
from its own checkpoint at the same TP/PP/EP layout, frozen, forward-only on the same micro-batch; with pp > 1 its
activations travel with the student's through the pipeline (`train/pair.py`). The loop is generic: the objective
(LM, KD and MTP terms, `megatron_slim.distill.objective`) is the forward step it hands to megatron-core's schedule;
with loss.mtp_kd_source: mtp the teacher is built with the student's number of MTP depths. With bf16 the student is
loaded before the optimizer is built: megatron-core's optimizer keeps fp32 master copies of the bf16 weights, taken
when it is built.
SIGTERM/SIGUSR1 (SLURM preemption, time limit) -> checkpoint at the next step boundary and exit 75, launch.sh's
"requeue me" status. A step whose loss or gradients are not finite is skipped on every rank (train/guard.py); too
many in a row end the run without saving, with DIVERGED_EXIT_CODE (86).
The run trains on data-stream samples [data.sample_offset, + steps x global batch) (train/data.py); the offset is
kept in every checkpoint, and a resume with another offset is refused.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

from megatron_slim.checkpoint.files import Checkpoint
from megatron_slim.distill.objective import forward_step
from megatron_slim.errors import UserError
from megatron_slim.models.unwrap import unwrap_model
from megatron_slim.runtime.preemption import REQUEUE_EXIT_CODE, StopFlag
from megatron_slim.train import checkpointing
from megatron_slim.train.config import RunConfig, run_config_to_dict
from megatron_slim.train.evaluation import HeldOutEvaluation, evaluation_due, keep_records_up_to
from megatron_slim.train.guard import DIVERGED_EXIT_CODE, StepGuard, injected_nan_steps, poisoned


class _RouterLoad:
    """Tokens routed to each expert, per MoE layer, summed over a step's micro-batches: forward hooks on the
    student's megatron-core TopKRouters, whose forward returns (probs, routing_map [tokens, experts])."""

    def __init__(self, model: torch.nn.Module) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        self.counts: dict[int, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, TopKRouter)]

    def _hook(self, module, args, output) -> None:
        per_expert = output[1].detach().sum(0)  # stays on the device: no sync until the step's report
        key = id(module)
        self.counts[key] = self.counts[key] + per_expert if key in self.counts else per_expert

    def imbalance(self) -> float | None:
        """Mean over MoE layers of max / mean tokens per expert (1 = perfectly balanced)."""
        if not self.counts:
            return None
        ratios = torch.stack([c.max().float() / c.float().mean().clamp_min(1e-9) for c in self.counts.values()])
        return ratios.mean().item()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _active_params(cfg) -> float:
    """Weights a token's matmuls use (routed experts: top-k of E; no embedding lookup), for the MFU estimate."""
    from megatron_slim.compress.accounting import account

    acc = account(cfg)
    return acc.active - acc.components["embeddings"].active


def student_build_options(c: RunConfig):
    """How the trainer builds the student: precision, FP8, MoE loss coefficients and the memory knobs."""
    from megatron_slim.models.builder import BuildOptions

    r = c.memory.recompute
    rk = c.memory.recompute_kwargs()
    return BuildOptions(params_dtype=torch.bfloat16 if c.precision.bf16 else torch.float32,
                        moe_aux_loss_coeff=c.loss.moe_aux_loss_coeff, moe_z_loss_coeff=c.loss.moe_z_loss_coeff,
                        mtp_loss_scaling_factor=0.0, fp8=c.precision.fp8, fp8_recipe=c.precision.fp8_recipe,
                        perform_initialization=False,  # both models are loaded from checkpoints (strictly)
                        recompute_granularity=r.granularity, recompute_method=rk.get("recompute_method"),
                        recompute_num_layers=rk.get("recompute_num_layers"),
                        recompute_modules=tuple(rk["recompute_modules"]) if "recompute_modules" in rk else None,
                        moe_token_dispatcher=c.memory.moe_token_dispatcher)


def teacher_build_options(c: RunConfig):
    """The frozen teacher: the student's kernels without recomputation (it runs no backward), and FP8 weights
    when memory.teacher_precision is fp8 (the run's fp8 format, e4m3 by default)."""
    import dataclasses

    opts = dataclasses.replace(student_build_options(c), recompute_granularity=None, recompute_method=None,
                               recompute_num_layers=None, recompute_modules=None)
    if c.memory.teacher_precision == "fp8":
        opts = dataclasses.replace(opts, fp8=c.precision.fp8 or "e4m3", fp8_param=True)
    return opts


def ddp_config(c: RunConfig):
    """megatron-core DDP settings: the distributed optimizer, gradient dtype and communication overlap."""
    from megatron.core.distributed import DistributedDataParallelConfig

    m = c.memory
    return DistributedDataParallelConfig(use_distributed_optimizer=True,
                                         grad_reduce_in_fp32=m.grad_reduce_dtype == "fp32",
                                         overlap_grad_reduce=m.overlap_grad_reduce,
                                         overlap_param_gather=m.overlap_param_gather)


class Trainer:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    # ---- set-up -------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from megatron.core import parallel_state
        from megatron.core.distributed import (
            DistributedDataParallel,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from megatron_slim.checkpoint.mcore import load_model, load_model_config
        from megatron_slim.models.builder import build_model
        from megatron_slim.runtime.distributed import init_distributed, init_model_parallel

        c = self.cfg
        init_distributed()
        c.validate(dist.get_world_size())
        self.parallel = c.parallel
        init_model_parallel(self.parallel, seed=c.train.seed)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        dtype = torch.bfloat16 if c.precision.bf16 else torch.float32

        self._check_corpus()  # before any model is built: a too small corpus costs nothing
        self.model_cfg = load_model_config(c.model.checkpoint)
        self.evaluation = None
        if c.evaluation.enabled:  # the held-out windows are read before any model is built: data errors come first
            self.evaluation = HeldOutEvaluation(c.evaluation, c.data.seq_length, Path(c.model.checkpoint),
                                                self.model_cfg, Path(c.checkpoint.save_dir))
        tcfg = None
        if c.teacher is not None:  # every check on the pair before any model is built
            tcfg = load_model_config(c.teacher.checkpoint)
            if tcfg.vocab_size != self.model_cfg.vocab_size:
                raise UserError(f"teacher vocab {tcfg.vocab_size} != student vocab {self.model_cfg.vocab_size}: "
                                "teacher and student must share the tokenizer")
            self._check_same_tokenizer(Path(c.teacher.checkpoint), Path(c.model.checkpoint))
            tcfg = tcfg.replace(mtp_num_layers=c.loss.teacher_mtp_depths(
                self.model_cfg.mtp_num_layers, tcfg.mtp_num_layers, c.model.checkpoint, c.teacher.checkpoint))
            if not self._teacher_used():
                why = " and loss.mtp_kd_weight 0" if self.model_cfg.mtp_num_layers else ", no student MTP heads"
                self._log_rank0(f"the teacher {c.teacher.checkpoint} is not loaded: no loss term uses it "
                                f"(loss.kd_weight 0{why})")
                tcfg = None
        opts = student_build_options(c)
        student = build_model(self.model_cfg, self.parallel, opts)
        self.teacher = None
        if tcfg is not None:
            self.teacher = build_model(tcfg, self.parallel, teacher_build_options(c))
            load_model(self.teacher, c.teacher.checkpoint, allow_nonfinite=c.checkpoint.allow_nonfinite)
            self.teacher.eval()
            for prm in self.teacher.parameters():
                prm.requires_grad_(False)
            self.teacher_cfg = tcfg

        resume = checkpointing.latest_step(c.checkpoint.save_dir)
        if resume is None:
            # Before the optimizer exists: with bf16 it copies the weights into fp32 master weights when built and
            # every step writes those back, so weights loaded later would be reverted to the random init at step 1.
            load_model(student, c.model.checkpoint, allow_nonfinite=c.checkpoint.allow_nonfinite)

        from megatron_slim.train.pair import DistillPair

        self.student = student
        trained = student if self.teacher is None else DistillPair(student, self.teacher)
        self.model = DistributedDataParallel(student.config, ddp_config(c), trained)
        student.config.finalize_model_grads_func = finalize_model_grads
        o = c.optimizer
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                            clip_grad=o.clip_grad, bf16=c.precision.bf16, params_dtype=dtype,
                            use_distributed_optimizer=True,
                            # a constant scale of 1 changes no number, and makes megatron-core's optimizer check
                            # the gradients for NaN/Inf on every rank and skip the update when one is found
                            loss_scale=1.0),
            [self.model])
        total, warmup = c.total_iters, c.warmup_iters
        style = {"cosine": "cosine", "linear": "linear", "constant": "constant", "wsd": "WSD"}[c.schedule.style]
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=warmup,
            lr_decay_steps=total, lr_decay_style=style, start_wd=o.weight_decay, end_wd=o.weight_decay,
            wd_incr_steps=total, wd_incr_style="constant",
            wsd_decay_steps=math.ceil(total * c.schedule.wsd_decay_fraction) if style == "WSD" else None,
            lr_wsd_decay_style=c.schedule.wsd_decay_style if style == "WSD" else None)

        self.step = 0
        self.resumed_step = resume
        if resume is not None:
            state = checkpointing.load(c.checkpoint.save_dir, resume, student, self.optimizer, self.scheduler,
                                       allow_nonfinite=c.checkpoint.allow_nonfinite)
            self.step = state["step"]
            saved_offset = state["extra"].get("sample_offset", 0)
            if saved_offset != c.data.sample_offset:
                raise UserError(f"cannot resume from {checkpointing.iter_dir(Path(c.checkpoint.save_dir), resume)}: "
                                f"it trained from data-stream sample {saved_offset}, this config says "
                                f"data.sample_offset {c.data.sample_offset}")
            self.skipped_in_a_row = int(state["extra"].get("skipped_in_a_row", 0))
            self._log_rank0(f"resumed from {c.checkpoint.save_dir} at step {self.step}")
        else:
            self._log_rank0(f"initialised student from {c.model.checkpoint}")
        self._build_data()
        self.router_load = _RouterLoad(student)
        self.stop = StopFlag()
        self.forward_step = forward_step(c.loss, student, self.tp_group, distilled=self.teacher is not None)
        self.guard = StepGuard(c.guard)
        self.guard.consecutive = getattr(self, "skipped_in_a_row", 0)
        self.inject_nan = injected_nan_steps()
        self.last_finite = True  # whether the newest step's loss was finite (recorded with each checkpoint)
        self.async_strategy, self.async_queue = checkpointing.async_saving() if c.checkpoint.async_save else ("", None)
        self.reporter = (parallel_state.is_pipeline_last_stage()
                         and parallel_state.get_tensor_model_parallel_rank() == 0 and self.dp_rank == 0)
        self.logger = None
        if self.reporter:
            from megatron_slim.train.metrics import MetricsLogger

            self.logger = MetricsLogger(c.checkpoint.save_dir, Path(c.checkpoint.save_dir).name,
                                        run_config_to_dict(c), c.logging.wandb_project, c.logging.wandb_mode)
            if self.evaluation is not None:  # the steps after the checkpoint run again, and so do their records
                keep_records_up_to(self.evaluation.path, resume)
            keep_records_up_to(self.logger.path, resume)  # metrics.jsonl: each step once

    def _teacher_used(self) -> bool:
        """Whether a loss term reads the teacher's outputs: the KD term, or MTP KD on a student with MTP heads."""
        loss = self.cfg.loss
        return loss.kd_weight > 0 or (loss.mtp_kd_weight > 0 and self.model_cfg.mtp_num_layers > 0)

    @staticmethod
    def _check_same_tokenizer(a: Path, b: Path) -> None:
        ta, tb = (Checkpoint(p, "mcore").tokenizer_files / "tokenizer.json" for p in (a, b))
        if ta.is_file() and tb.is_file() and ta.read_bytes() != tb.read_bytes():
            raise UserError(f"teacher and student tokenizers differ ({ta} vs {tb})")

    def _num_samples(self) -> tuple[int, int, int]:
        c = self.cfg
        return c.stream_samples, c.batch.global_batch_size, 0

    def _check_corpus(self) -> None:
        """Refuse a stream that reads a dataset more than data.max_epochs times, or an empty split; print the
        blend's usage."""
        from megatron_slim.train.data import check_corpus, corpus_usage, usage_lines

        c = self.cfg
        usages = corpus_usage(c.data.blend, c.data.split, c.data.seq_length, self._num_samples())
        check_corpus(usages, c.data.max_epochs)
        self._log_rank0(f"data stream: {c.stream_samples} samples, this run {c.data.sample_offset}.."
                        f"{c.data.sample_offset + c.run_samples}; " + "; ".join(usage_lines(usages)))

    def _build_data(self) -> None:
        from megatron_slim.train.data import build_datasets, tokenizer_info

        c = self.cfg
        cache = c.data.cache_dir or str(Path(c.checkpoint.save_dir) / "data_cache")
        tok = tokenizer_info(c.model.checkpoint, self.model_cfg.vocab_size)
        self.train_ds, self.valid_ds, _ = build_datasets(
            c.data.blend, c.data.split, c.data.seq_length, self._num_samples(), c.data_seed, tok, cache,
            c.data.eod_mask_loss)

    def _log_rank0(self, msg: str) -> None:
        if dist.get_rank() == 0:
            print(msg, flush=True)

    # ---- one step -----------------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_slim.train.data import microbatches

        c = self.cfg
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.router_load.counts = {}
        nmb = c.batch.global_batch_size // (c.batch.micro_batch_size * self.dp_size)
        it = microbatches(self.train_ds, self.step, c.batch.global_batch_size, c.batch.micro_batch_size,
                          self.dp_rank, self.dp_size, offset=c.data.sample_offset)
        widen = unwrap_model(self.model).pipeline_shapes if self.teacher is not None and self.parallel.pp > 1 else None
        step_fn = poisoned(self.forward_step) if self.step + 1 in self.inject_nan else self.forward_step
        results = get_forward_backward_func()(
            forward_step_func=step_fn, data_iterator=it, model=[self.model], num_microbatches=nmb,
            seq_length=c.data.seq_length, micro_batch_size=c.batch.micro_batch_size, forward_only=False,
            adjust_tensor_shapes_fn=widen)
        terms: dict = {}
        if results:
            from megatron.core import parallel_state

            keys = sorted(results[0])
            means = torch.stack([torch.stack([r[k] for r in results]).mean() for k in keys])
            dist.all_reduce(means, group=parallel_state.get_data_parallel_group())
            terms = {k: (v / self.dp_size).item() for k, v in zip(keys, means)}
        loss = terms.get("loss")
        verdict = self.guard.verdict(loss)  # collective: the same on every rank
        ok, grad_norm = False, None
        if not verdict.skip:
            # skips by itself (on every rank alike) when a gradient is not finite
            ok, grad_norm, _ = self.optimizer.step()
        skipped = not ok
        if ok:  # as Megatron-LM: the schedule advances with the updates
            self.scheduler.step(increment=1)
        self.step += 1
        self.last_finite = not (verdict.non_finite or (skipped and not verdict.spike))
        median = self.guard.median()
        self.guard.record(loss, skipped)
        record: dict = {"step": self.step, "consumed_tokens": self.step * c.tokens_per_step,
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "grad_norm": float(grad_norm) if grad_norm is not None else None, "update_ok": bool(ok),
                        "skipped": skipped, "moe_load_imbalance": self.router_load.imbalance()}
        if c.guard.spike_factor:
            record.update(spike=verdict.spike, loss_median=median)
        if skipped or verdict.spike:
            why = ("non-finite loss" if verdict.non_finite else "loss spike" if verdict.spike and skipped
                   else "non-finite gradients" if skipped else "loss spike (update kept)")
            self._log_rank0(f"step {self.step}: {why}; {'update skipped, ' if skipped else ''}"
                            f"{self.guard.consecutive} skipped in a row (guard.max_skipped_steps "
                            f"{c.guard.max_skipped_steps}), {self.guard.total} in total")
        record.update(terms)
        return record

    # ---- the loop -----------------------------------------------------------------------------------------------
    def save(self, background: bool = False) -> None:
        """Collective: checkpoint this step; `background` (a periodic save with checkpoint.async_save) returns
        while a forked process writes it (completed by the queue: at the next step, save or exit)."""
        c = self.cfg
        if self.async_queue is not None:  # the previous save completes first (in order; its .tmp is in use)
            self.async_queue.maybe_finalize_async_calls(blocking=True)
        tokenizer = Checkpoint(Path(c.model.checkpoint), "mcore").tokenizer_files
        start = c.data.sample_offset
        extra = {"consumed_tokens": self.step * c.tokens_per_step, "sample_offset": start,
                 "data_samples": [start, start + self.step * c.batch.global_batch_size],
                 "skipped_in_a_row": self.guard.consecutive}
        checkpointing.save(c.checkpoint.save_dir, self.step, self.student, self.optimizer, self.scheduler,
                           self.model_cfg, extra, c.checkpoint.keep_last, tokenizer if tokenizer.is_dir() else None,
                           keep_every=c.checkpoint.keep_every, finite=self.last_finite,
                           async_queue=(self.async_strategy, self.async_queue) if background else None)

    def evaluate(self) -> float:
        """Collective: the held-out evaluation of the student as it is now (train/evaluation.py); seconds taken."""
        start = time.time()
        self.evaluation.run(self.student, self.step, self.step * self.cfg.tokens_per_step, write=self.reporter)
        return time.time() - start

    def train(self) -> int:
        """Steps to the end, to an exit_interval boundary (0) or to an agreed stop signal (REQUEUE_EXIT_CODE); each
        way out saves a checkpoint first, after the step's held-out evaluation when one is due. After
        guard.max_skipped_steps consecutive skipped steps: no save, DIVERGED_EXIT_CODE."""
        c = self.cfg
        total = c.total_iters
        active = 0.0
        if c.logging.peak_tflops:  # training FLOPs ~ 6 * active params per token; the teacher adds a forward (2x)
            active = _active_params(self.model_cfg) + (_active_params(self.teacher_cfg) / 3 if self.teacher else 0)
        if self.evaluation is not None and self.resumed_step is None:
            self.evaluate()  # step 0: the student as initialised
        t_last, steps_since, status = time.time(), 0, 0
        while self.step < total:
            record = self.train_step()
            if self.async_queue is not None:  # collective: completes background saves that have been written
                self.async_queue.maybe_finalize_async_calls(blocking=False)
            steps_since += 1
            if self.reporter and (self.step % c.logging.log_interval == 0 or self.step == total):
                dt = time.time() - t_last
                tps = steps_since * c.tokens_per_step / dt
                record["tokens_per_s"] = tps
                record["step_time_s"] = dt / steps_since
                record["mfu"] = (6 * active * tps / (dist.get_world_size() * c.logging.peak_tflops * 1e12)
                                 if c.logging.peak_tflops else None)
                record["memory_gb"] = (torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
                                       else psutil.Process().memory_info().rss / 2**30)
                self.logger.log(record)
                t_last, steps_since = time.time(), 0
            if self.guard.exhausted:  # every rank agreed on each skip: all stop here
                self._close()  # background saves in flight complete first: they hold good states
                self._log_rank0(self.diverged_message())
                return DIVERGED_EXIT_CODE
            if self.evaluation is not None and evaluation_due(self.step, total, c.tokens_per_step,
                                                              c.evaluation.every_tokens):
                t_last += self.evaluate()  # not part of the next logged step's time
            if c.checkpoint.save_interval and self.step % c.checkpoint.save_interval == 0 and self.step < total:
                self.save(background=self.async_queue is not None)
            if c.train.exit_interval and self.step % c.train.exit_interval == 0 and self.step < total:
                self._log_rank0(f"exit_interval: checkpointing at step {self.step} and exiting")
                break
            if self.stop.agreed():
                self._log_rank0(f"stop signal: checkpointing at step {self.step} and exiting for requeue")
                status = REQUEUE_EXIT_CODE
                break
        self.save()
        self._close()
        return status

    def diverged_message(self) -> str:
        last = checkpointing.last_finite_step(self.cfg.checkpoint.save_dir)
        where = (f"the last checkpoint with a finite loss is "
                 f"{checkpointing.iter_dir(Path(self.cfg.checkpoint.save_dir), last)}" if last is not None
                 else f"no checkpoint was saved; the run started from {self.cfg.model.checkpoint}")
        return (f"stopping at step {self.step}: {self.guard.consecutive} consecutive steps skipped for non-finite "
                f"loss or gradients (guard.max_skipped_steps {self.cfg.guard.max_skipped_steps}); nothing saved; "
                f"{where}")

    def _close(self) -> None:
        if self.async_queue is not None:  # every way out: background saves complete (they are good checkpoints)
            self.async_queue.close()
        self.router_load.remove()
        if self.logger is not None:
            self.logger.close()
        # last: a SIGTERM while the logger closes (srun ending this rank because a peer already exited 75) is a
        # stop request, not a kill; the CLI then ignores such signals until the process has exited
        self.stop.restore()
