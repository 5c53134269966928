"""Functions that run on every rank of `support.dist.run_distributed`: build, save, load and train tiny Megatron
models at a given TP/PP/EP layout, and return logits, losses or parameter counts.

Spawned workers import a function by its module and name, so these stay at module level; a worker that one test
file alone uses may live in that file instead (test_kd_losses.py, test_evaluate.py do so).
"""
from __future__ import annotations

import torch

from megatron_slim.checkpoint.mcore import load_model, load_model_config, save_model
from megatron_slim.models.builder import build_model
from megatron_slim.models.config import ModelConfig
from megatron_slim.models.forward import full_logits
from megatron_slim.models.registry import model_config_from_hf
from megatron_slim.runtime.distributed import init_model_parallel
from megatron_slim.runtime.layout import ParallelLayout
from support import tiny_models


def tiny_config(family: str, **over):
    return model_config_from_hf(tiny_models.FAMILIES[family](**over),
                                mtp_num_layers=1 if family == "qwen3_next" else 0)


def save_reference(rank: int, world: int, family: str, ckpt_dir: str, tokens: torch.Tensor, seed: int = 7):
    """Build at TP=1 with random weights, save a distributed checkpoint, return full logits."""
    parallel = ParallelLayout()
    init_model_parallel(parallel, seed=seed)
    cfg = tiny_config(family)
    model = build_model(cfg, parallel)
    save_model(model, ckpt_dir, cfg)
    return full_logits(model, tokens, micro_batch_size=1)


def layout_sweep(rank: int, world: int, families: list[str], layouts: dict[str, dict], tokens: torch.Tensor,
                 ckpt_root: str) -> dict:
    """In one set of processes (process start-up dominates on small machines): per family save a TP=1 checkpoint
    and its logits, then load it at every layout. Returns {family: {"tp1": logits, layout: logits or None}}."""
    from pathlib import Path

    out: dict = {}
    for family in families:
        ckpt = str(Path(ckpt_root) / family)
        out[family] = {"tp1": save_reference(rank, world, family, ckpt, tokens)}
        for name, layout in layouts.items():
            out[family][name] = logits_at_layout(rank, world, ckpt, tokens, layout)
    return out


def logits_at_layout(rank: int, world: int, ckpt_dir: str, tokens: torch.Tensor, layout: dict):
    """Load the checkpoint at another layout; return full logits (None on non-last pipeline stages)."""
    parallel = ParallelLayout(**layout)
    init_model_parallel(parallel, seed=1000 + rank)  # different init everywhere: only loaded weights may matter
    cfg = load_model_config(ckpt_dir)
    model = build_model(cfg, parallel)
    load_model(model, ckpt_dir)
    return full_logits(model, tokens, micro_batch_size=1)


def train_steps(rank: int, world: int, family: str, steps: int, tokens: torch.Tensor):
    """A few Adam steps on a fixed batch: return the loss curve and whether every parameter got a gradient."""
    parallel = ParallelLayout()
    init_model_parallel(parallel, seed=3)
    model = build_model(tiny_config(family), parallel)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    losses, missing = [], set()
    for _ in range(steps):
        opt.zero_grad()
        loss = model(tokens[:, :-1], pos[:, :-1], None, labels=tokens[:, 1:]).mean()
        loss.backward()
        missing |= {n for n, p in model.named_parameters() if p.grad is None}
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "missing_grads": sorted(missing)}


def batch_major_logits_check(rank: int, world: int, family: str, tokens: torch.Tensor):
    """Logits, their loss with labels, and gradients of a built model (output layer computing [b, s, v] memory
    order, builder.batch_major_logits), then the same with that layout's hooks removed: both as tensors."""
    init_model_parallel(ParallelLayout(), seed=3)
    model = build_model(tiny_config(family), ParallelLayout())
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)

    def run() -> dict:
        model.zero_grad()
        logits = model(tokens[:, :-1], pos[:, :-1], None)
        (logits.float().logsumexp(-1).sum() - logits[..., 0].sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        loss = model(tokens[:, :-1], pos[:, :-1], None, labels=tokens[:, 1:])  # the labels path is unchanged
        return {"logits": logits.detach(), "contiguous": logits.is_contiguous(), "loss": loss.detach(),
                "grads": grads}

    hooked = run()
    for module in (model, model.output_layer):
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
    return {"hooked": hooked, "plain": run()}


def verify_sweep(rank: int, world: int, hf_dir: str, mcore_dir: str, layouts: dict[str, dict], tokens: torch.Tensor):
    """`megatron-slim verify` at several layouts in one set of processes: {layout: report} on the reporting rank."""
    from megatron_slim.verify.parity import hf_parity, megatron_logits

    reports = {}
    for name, layout in layouts.items():
        _, logits, mtp = megatron_logits(mcore_dir, tokens, ParallelLayout(**layout))
        if logits is not None:
            reports[name] = hf_parity(hf_dir, tokens, logits, mtp)
    return reports


def parameter_numels(rank: int, world: int, configs: dict[str, ModelConfig]) -> dict[str, dict[str, int]]:
    """{config name: {parameter name: numel}} of the HybridModel built from each config at TP=PP=EP=1: the real
    Megatron-Core counts that test_plan.py checks the parameter accounting against."""
    init_model_parallel(ParallelLayout(), seed=0)
    return {name: {n: p.numel() for n, p in build_model(cfg, ParallelLayout()).named_parameters()}
            for name, cfg in configs.items()}
