"""What only a GPU can show: fla's Triton GDN kernels against the CPU recurrence and under the generation cache,
the KD loss at full vocabulary on CUDA against float64 and within its memory budget, bf16 online-teacher
distillation with its cost, and the memory plan of that distillation against torch.cuda.max_memory_allocated.

Tolerances. The CUDA and CPU models run in fp32 with the same weights (the CPU run's checkpoint); torch's own
matmuls and convolutions have TF32 turned off here, but fla's chunked kernels use TF32 tensor-core dots (10
mantissa bits, unit roundoff 2^-11 = 4.9e-4) over 64-wide tiles, about 8 * 4.9e-4 = 4e-3 relative per
dot, and a few tokens whose top-k experts are near ties can route differently. Hence norm-wise (not max)
criteria at 1e-2 for logits and 2e-2 for gradients, 1e-3 for the scalar loss, and top-1 agreement >= 99%. The
KD loss is computed in fp32 from fp32 logits and compared with the float64 definition: only fp32 rounding in
softmax sums over 151,936 terms remains, hence rtol 1e-4 on the loss and 1e-3 of the largest gradient entry.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from gpu_models import cached_step_logits, forward_backward, qwen3_next_hf
from test_kd_losses import ref_kd

from support.hf_checkpoints import build_tiny_hf
from support.train_assets import cli, convert, metrics, write_config, write_toy_data

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = Path(__file__).resolve().parents[2]
H100_BF16_DENSE_TFLOPS = 989.0  # H100/H200 SXM peak dense bf16, the MFU denominator


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_qwen3_next_forward_backward_on_cuda_matches_cpu(tmp_path, figures, cuda_model_parallel):
    from megatron_slim.checkpoint.mcore import load_model, load_model_config
    from megatron_slim.models.builder import BuildOptions, build_model
    from megatron_slim.runtime.layout import ParallelLayout

    path = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    subprocess.run([sys.executable, str(Path(__file__).with_name("gpu_models.py")), str(tmp_path)], env=env,
                   check=True, timeout=300)
    ref = torch.load(tmp_path / "reference.pt", weights_only=True)

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = load_model_config(tmp_path / "ckpt")
    model = build_model(cfg, ParallelLayout(), BuildOptions(transformer_impl="local"))
    assert next(model.parameters()).is_cuda
    load_model(model, tmp_path / "ckpt")
    logits, loss, grads = forward_backward(model, ref["tokens"].cuda(), ref["labels"].cuda())

    assert grads.keys() == ref["grads"].keys()
    flat = torch.cat([grads[k].flatten() for k in sorted(grads)])
    flat_ref = torch.cat([ref["grads"][k].flatten() for k in sorted(grads)])
    found = {"logits_rel_err": _relative(logits, ref["logits"]),
             "logits_max_abs_err": (logits - ref["logits"]).abs().max().item(),
             "loss_gpu": loss.item(), "loss_cpu": ref["loss"].item(),
             "loss_rel_err": abs(loss.item() - ref["loss"].item()) / abs(ref["loss"].item()),
             "grads_rel_err": _relative(flat, flat_ref),
             "worst_param_grad_rel_err": max(_relative(grads[k], ref["grads"][k]) for k in grads
                                             if ref["grads"][k].norm() > 0),
             "top1_agreement": (logits.argmax(-1) == ref["logits"].argmax(-1)).float().mean().item()}
    figures["qwen3_next_cuda_vs_cpu"] = found
    assert found["logits_rel_err"] <= 1e-2, found
    assert found["loss_rel_err"] <= 1e-3, found
    assert found["grads_rel_err"] <= 2e-2, found
    assert found["top1_agreement"] >= 0.99, found


def test_generation_cache_on_cuda_matches_the_full_forward(figures, cuda_model_parallel):
    """fla's chunked kernel continuing from a stored recurrent state (prefill of 100 tokens: one full and one
    partial 64-tile) and the float32 one-token recurrence (models/gdn.py), with megatron-core's KV cache for the
    attention layer, against one full forward of the generated sequences. TF32 in fla's dots (see above) bounds
    the norm-wise error at 1e-2; a position's top-1 must agree wherever its top-2 margin exceeds 0.05 (ten times
    the ~4e-3 that TF32 dots put on a logit of magnitude ~1; this model's logits have std ~0.3). Timings of 64
    greedy tokens both ways go to the figures."""
    from megatron_slim.eval.generate import greedy_continuation, kv_cache_blocker
    from megatron_slim.models.builder import BuildOptions, build_model
    from megatron_slim.models.forward import position_ids_for
    from megatron_slim.models.registry import model_config_from_hf
    from megatron_slim.runtime.layout import ParallelLayout

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = model_config_from_hf(qwen3_next_hf())
    model = build_model(cfg, ParallelLayout(), BuildOptions(transformer_impl="local"))
    model.eval()
    assert kv_cache_blocker(model) is None
    prompts = torch.randint(0, cfg.vocab_size, (4, 100), generator=torch.Generator().manual_seed(0)).cuda()
    cached, seqs = cached_step_logits(model, prompts, 32)
    with torch.no_grad():
        full = model(seqs, position_ids_for(seqs), None)[:, prompts.shape[1] - 1:].float()
    top2 = full.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.05
    agree = cached.argmax(-1) == full.argmax(-1)

    def timed(kv_cache: bool) -> float:
        greedy_continuation(model, prompts, 4, micro_batch=4, kv_cache=kv_cache)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        greedy_continuation(model, prompts, 64, micro_batch=4, kv_cache=kv_cache)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    found = {"logits_rel_err": _relative(cached, full), "top1_agreement": agree.float().mean().item(),
             "clear_positions": int(clear.sum()), "clear_top1_agreement": agree[clear].float().mean().item(),
             "full_prefix_s_64_tokens": timed(False), "cached_s_64_tokens": timed(True)}
    found["speedup"] = found["full_prefix_s_64_tokens"] / found["cached_s_64_tokens"]
    figures["generation_cache_cuda"] = found
    assert found["logits_rel_err"] <= 1e-2, found
    assert found["clear_positions"] >= 64 and found["clear_top1_agreement"] == 1.0, found


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_kd_loss_on_cuda_matches_float64(kind, figures):
    from megatron_slim.distill.losses import kd_loss

    tokens, vocab, temperature = 1024, 151_936, 2.0
    g = torch.Generator(device="cuda").manual_seed(0)
    student = (3.0 * torch.randn(tokens, vocab, device="cuda", generator=g)).requires_grad_()
    teacher = 3.0 * torch.randn(tokens, vocab, device="cuda", generator=g)
    mask = (torch.rand(tokens, device="cuda", generator=g) > 0.25).float()
    loss = kd_loss(student, teacher, kind=kind, temperature=temperature, loss_mask=mask)
    loss.backward()
    ref_student = student.detach().double().requires_grad_()
    ref = ref_kd(ref_student, teacher.double(), kind, temperature, mask.double())
    ref.backward()
    loss_err = abs(loss.item() - ref.item()) / abs(ref.item())
    grad_err = (student.grad.double() - ref_student.grad).abs().max().item() / ref_student.grad.abs().max().item()
    figures.setdefault("kd_loss_cuda_vs_float64", {})[kind] = {"loss_rel_err": loss_err,
                                                               "grad_max_err_over_max_grad": grad_err}
    assert loss_err <= 1e-4 and grad_err <= 1e-3, (loss_err, grad_err)


def test_kd_loss_peak_memory_at_full_vocabulary(figures):
    """Target (issue #15): peak memory of the loss's forward + backward <= 1.3x the two bf16 logits tensors at
    vocab 151,936 x 8,192 tokens."""
    from megatron_slim.distill.losses import kd_loss

    tokens, vocab = 8192, 151_936
    student = torch.randn(tokens, vocab, device="cuda", dtype=torch.bfloat16).requires_grad_()
    teacher = torch.randn(tokens, vocab, device="cuda", dtype=torch.bfloat16)
    logits_bytes = student.nbytes + teacher.nbytes
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    kd_loss(student, teacher, kind="fkl", temperature=1.0).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    ratio = (logits_bytes + extra) / logits_bytes
    figures["kd_loss_peak_memory"] = {"tokens": tokens, "vocab": vocab, "logits_gib": logits_bytes / 2**30,
                                      "peak_extra_gib": extra / 2**30, "peak_over_logits": ratio}
    assert ratio <= 1.3, figures["kd_loss_peak_memory"]


def _pair(root: Path) -> None:
    """Qwen3-Next-shaped teacher (4 layers) and student (2 layers), converted by the CLI, and toy data."""
    convert(build_tiny_hf(qwen3_next_hf(), 0), root, "teacher")
    convert(build_tiny_hf(qwen3_next_hf(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"]),
                          1), root, "student")
    write_toy_data(root)


def _plan_against_cuda(config: Path, measured: float, figures: dict) -> None:
    """The memory plan (train/memory_plan.py) of that distillation next to torch.cuda.max_memory_allocated (which
    leaves out the CUDA context): the first lent GPU calibrates the plan's GPU formulas. Only a gross error fails."""
    from megatron_slim.checkpoint.mcore import load_model_config
    from megatron_slim.models.specs import have_transformer_engine
    from megatron_slim.train.config import load_run_config
    from megatron_slim.train.memory_plan import plan_stage, setup_of

    run = load_run_config(config)
    setup = setup_of("distill", run, load_model_config(run.model.checkpoint), load_model_config(run.teacher.checkpoint),
                     1, None, backend="transformer_engine" if have_transformer_engine() else "local")
    plan = plan_stage(setup)
    planned = plan.total_bytes - plan.per_gpu_bytes["cuda_context_comm"]
    figures["memory_plan_vs_cuda"] = {"planned_bytes": planned, "max_memory_allocated_bytes": measured,
                                      "planned_over_measured": planned / measured,
                                      "components": plan.per_gpu_bytes}
    print(f"\nmemory plan vs CUDA: {figures['memory_plan_vs_cuda']}")
    assert 0.25 < planned / measured < 4, figures["memory_plan_vs_cuda"]


def test_bf16_distillation_step_with_online_teacher(tmp_path, figures):
    """Real `megatron-slim train` runs on the GPU in bf16 (a child process each, as users run it): distillation
    with the teacher online, and the student alone with the same data, for the teacher's overhead."""
    _pair(tmp_path)
    common = dict(precision={"bf16": True}, data={"seq_length": 256}, train={"train_iters": 12, "seed": 3},
                  batch={"micro_batch_size": 4, "global_batch_size": 8},
                  logging={"log_interval": 1, "peak_tflops": H100_BF16_DENSE_TFLOPS})
    cli("train", "--config", str(write_config(tmp_path, "distill", **common)))
    cli("train", "--config", str(write_config(tmp_path, "alone", teacher=False, loss={"kd_weight": 0.0}, **common)))
    distill, alone = metrics(tmp_path, "distill"), metrics(tmp_path, "alone")
    assert all(torch.isfinite(torch.tensor([r["loss"], r["kd"], r["lm"]])).all() for r in distill)
    steady = slice(3, None)  # the first steps compile kernels (fla's Triton autotuning) and warm the allocator
    t_distill = statistics.median(r["step_time_s"] for r in distill[steady])
    t_alone = statistics.median(r["step_time_s"] for r in alone[steady])
    figures["bf16_distillation"] = {
        "loss_first": distill[0]["loss"], "loss_last": distill[-1]["loss"],
        "tokens_per_s_with_teacher": statistics.median(r["tokens_per_s"] for r in distill[steady]),
        "tokens_per_s_alone": statistics.median(r["tokens_per_s"] for r in alone[steady]),
        "step_time_s_with_teacher": t_distill, "step_time_s_alone": t_alone,
        "teacher_overhead_ratio": t_distill / t_alone,
        "mfu_with_teacher": statistics.median(r["mfu"] for r in distill[steady]),
        "memory_gb": max(r["memory_gb"] for r in distill)}
    print(f"\nbf16 distillation: {figures['bf16_distillation']}")
    _plan_against_cuda(tmp_path / "distill.yaml", max(r["memory_gb"] for r in distill) * 2**30, figures)
    # random models: the LM term dominates (~8 vs ~0.1 for KD between two near-uniform models), so the total falls
    assert distill[-1]["loss"] < distill[0]["loss"], figures["bf16_distillation"]
