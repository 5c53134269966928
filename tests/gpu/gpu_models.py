"""The Qwen3-Next-shaped model of the GPU checks, its forward/backward, and the CPU reference run.

`python tests/gpu/gpu_models.py OUT_DIR` (run by the parity check with CUDA hidden, and on CPU machines as the
check's rehearsal) builds the model with a fixed seed on CPU with the local backend (torch GDN recurrence),
saves it as a Megatron checkpoint, and saves its logits, loss and gradients for fixed tokens: the GPU side
loads that checkpoint, so it also shows a CPU-written checkpoint running on the GPU.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ helpers when run as a script

from support import tiny_models  # noqa: E402

SEQ, BATCH = 256, 2


def qwen3_next_hf(**over) -> dict:
    """Qwen3-Next's layer types, gating, shared expert and partial RoPE at a size that runs in seconds: GDN heads
    of 64 (fla's kernels tile by 64), 3 GDN + 1 gated-attention layers, 16 experts top-4."""
    shape = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=64, linear_key_head_dim=64,
                 linear_value_head_dim=64, linear_num_key_heads=4, linear_num_value_heads=8,
                 moe_intermediate_size=128, shared_expert_intermediate_size=256, num_experts=16,
                 num_experts_per_tok=4, max_position_embeddings=4096, initializer_range=0.02)
    return tiny_models.qwen3_next(**{**shape, **over})


def batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def forward_backward(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Logits (fp32, CPU), the mean next-token loss, and every parameter's gradient (fp32, CPU)."""
    from megatron_slim.models.forward import position_ids_for

    model.zero_grad(set_to_none=True)
    logits = model(tokens, position_ids_for(tokens), None)
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
    loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float().cpu(), loss.detach().float().cpu(), grads


def cached_step_logits(model: torch.nn.Module, prompts: torch.Tensor, steps: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generation through the generation cache (models/gdn.py), keeping every step's logits: (logits of the
    `steps` generated positions [B, steps, V] fp32, the sequences [B, P + steps - 1] whose full forward must give
    them at positions P-1 ...)."""
    from megatron_slim.models.gdn import GenerationContext

    context = GenerationContext(prompts.shape[0], prompts.shape[1] + steps)
    ids, seqs, out = prompts, prompts, []
    with torch.no_grad():
        for _ in range(steps):
            start = context.sequence_len_offset
            positions = torch.arange(start, start + ids.shape[1], device=ids.device).expand_as(ids)
            logits = model(ids, positions, None, inference_context=context)[:, -1].float()
            context.sequence_len_offset += ids.shape[1]
            out.append(logits)
            ids = logits.argmax(-1, keepdim=True)
            seqs = torch.cat([seqs, ids], dim=1)
    return torch.stack(out, dim=1), seqs[:, :-1]


def cpu_reference(out_dir: Path) -> None:
    from megatron_slim.checkpoint.mcore import save_model
    from megatron_slim.models.builder import BuildOptions, build_model
    from megatron_slim.models.registry import model_config_from_hf
    from megatron_slim.runtime.distributed import init_model_parallel
    from megatron_slim.runtime.layout import ParallelLayout

    assert not torch.cuda.is_available(), "the reference runs on CPU (CUDA_VISIBLE_DEVICES='')"
    parallel = ParallelLayout()
    init_model_parallel(parallel, seed=1)
    cfg = model_config_from_hf(qwen3_next_hf())
    model = build_model(cfg, parallel, BuildOptions(transformer_impl="local"))
    save_model(model, out_dir / "ckpt", cfg)
    tokens, labels = batch(cfg.vocab_size)
    logits, loss, grads = forward_backward(model, tokens, labels)
    torch.save({"logits": logits, "loss": loss, "grads": grads, "tokens": tokens, "labels": labels},
               out_dir / "reference.pt")


if __name__ == "__main__":
    cpu_reference(Path(sys.argv[1]))
