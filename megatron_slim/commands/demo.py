"""The embedded default job (`make demo`).

Until the progressive-compression recipe lands, this runs the smallest end-to-end path that exists: build a
Qwen3-Next-shaped MoE (Gated DeltaNet + gated attention + shared expert + MTP) with Megatron-Core on this machine,
train it for a few steps, save a distributed checkpoint and reload it, checking the logits survive the round trip.
"""
from __future__ import annotations

import argparse
import tempfile
import time

HELP = "run the embedded end-to-end default job"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=20, help="optimizer steps")
    p.add_argument("--seed", type=int, default=0, help="random seed")


def _tiny_qwen3_next() -> dict:
    return dict(architectures=["Qwen3NextForCausalLM"], model_type="qwen3_next", vocab_size=256, hidden_size=128,
                intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                head_dim=32, hidden_act="silu", max_position_embeddings=512, rms_norm_eps=1e-6,
                rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.25, "rope_type": "default"},
                linear_conv_kernel_dim=4, linear_key_head_dim=32, linear_value_head_dim=32, linear_num_key_heads=2,
                linear_num_value_heads=4, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                num_experts_per_tok=2, num_experts=8, norm_topk_prob=True,
                layer_types=["linear_attention"] * 3 + ["full_attention"])


def run(args: argparse.Namespace) -> int:
    import torch

    from megatron_slim.checkpoint.mcore import load_model, save_model
    from megatron_slim.models.builder import build_model
    from megatron_slim.models.forward import full_logits
    from megatron_slim.models.registry import model_config_from_hf
    from megatron_slim.runtime.distributed import ParallelConfig, init_model_parallel

    parallel = ParallelConfig()
    init_model_parallel(parallel, seed=args.seed)
    cfg = model_config_from_hf(_tiny_qwen3_next(), mtp_num_layers=1)
    print(f"model: {cfg.family}, hybrid pattern {cfg.hybrid_pattern}")
    model = build_model(cfg, parallel)
    gen = torch.Generator().manual_seed(args.seed)
    # a learnable toy language: each sequence counts upward from a random start
    starts = torch.randint(0, cfg.vocab_size, (8, 1), generator=gen)
    tokens = (starts + torch.arange(65)) % cfg.vocab_size
    pos = torch.arange(64).expand(8, 64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    t0 = time.time()
    for step in range(args.steps):
        opt.zero_grad()
        loss = model(tokens[:, :-1], pos, None, labels=tokens[:, 1:]).mean()
        loss.backward()
        opt.step()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}  ({time.time() - t0:.1f}s)")
    with tempfile.TemporaryDirectory() as d:
        before = full_logits(model, tokens[:, :-1])
        save_model(model, d, cfg)
        reloaded = build_model(cfg, parallel)
        load_model(reloaded, d)
        diff = (full_logits(reloaded, tokens[:, :-1]) - before).abs().max().item()
    print(f"distributed checkpoint round trip: max |logit diff| = {diff:.2e}")
    return 0 if diff == 0.0 else 1
