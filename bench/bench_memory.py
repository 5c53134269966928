"""Saved-activation bytes per token per layer type, measured with saved-tensor hooks, against the memory plan.

Builds a small model of each family on CPU (torch-native kernels, fp32 unless --bf16), runs one training forward
under `train/activation_probe.py`'s hooks, and prints per layer type (Gated DeltaNet 'G', attention '*', MoE 'E',
dense MLP '-', MTP depth) the measured bytes per token, what `train/memory_plan.py` plans for the same layer and
their ratio, then the same with each recomputation setting. The plan's torch-native ("local") formulas are the
ones checked here; the Transformer Engine formulas are calibrated on a GPU by scripts/gpu_check.sh.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_memory.py --seq 128 --micro-batch 2
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny configs of the test suite


def _configs(hidden: int) -> dict:
    from support import tiny_models

    scale = dict(hidden_size=hidden, moe_intermediate_size=hidden // 2, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=hidden // 8)
    return {"qwen3_next": tiny_models.qwen3_next(**scale, shared_expert_intermediate_size=hidden,
                                                 linear_key_head_dim=hidden // 8, linear_value_head_dim=hidden // 8),
            "qwen3_moe": tiny_models.qwen3_moe(**scale),
            "mixtral": tiny_models.mixtral(**{**scale, "intermediate_size": hidden // 2})}


def measure(hf: dict, seq: int, batch: int, opts: dict) -> tuple[object, dict[str, list[int]], int]:
    from megatron_slim.models.builder import BuildOptions, build_model
    from megatron_slim.models.forward import position_ids_for
    from megatron_slim.models.registry import model_config_from_hf
    from megatron_slim.runtime.layout import ParallelLayout
    from megatron_slim.train.activation_probe import SavedActivations

    cfg = model_config_from_hf(hf, mtp_num_layers=1 if hf["model_type"] == "qwen3_next" else 0)
    model = build_model(cfg, ParallelLayout(), BuildOptions(**opts))
    model.train()
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq))
    probe = SavedActivations(model)
    with probe.measure():
        model(tokens, position_ids_for(tokens), None)
    per_type, total = probe.per_layer_type(cfg.hybrid_pattern), sum(probe.by_scope.values())
    probe.close()
    return cfg, per_type, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--bf16", action="store_true")
    a = p.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    from megatron_slim.runtime.distributed import free_port, init_model_parallel
    from megatron_slim.runtime.layout import ParallelLayout
    from megatron_slim.train.memory_plan import Batch, Knobs, activation_bytes, layer_bytes_per_token

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    init_model_parallel(ParallelLayout(), seed=0)
    dtype = torch.bfloat16 if a.bf16 else torch.float32
    knobs = Knobs(bf16=a.bf16, backend="local")
    tokens = a.seq * a.micro_batch
    names = {"G": "gdn", "*": "attention", "E": "moe", "-": "dense_mlp", "mtp": "mtp depth"}
    print(f"saved activation bytes per token, seq {a.seq} x micro-batch {a.micro_batch}, hidden {a.hidden}, "
          f"{'bf16' if a.bf16 else 'fp32'}, torch-native kernels on CPU")
    print(f"{'model':<12}{'layer':<12}{'measured':>12}{'plan':>12}{'plan/measured':>15}")
    for family, hf in _configs(a.hidden).items():
        cfg, per_type, _ = measure(hf, a.seq, a.micro_batch, {"params_dtype": dtype})
        for symbol, values in sorted(per_type.items()):
            if symbol == "head":
                continue
            got = sum(values) / len(values) / tokens
            if symbol == "mtp":
                plan = activation_bytes(cfg, ParallelLayout(), knobs, Batch(a.micro_batch, a.seq), 0)[
                    "activations.mtp"] / tokens
            else:
                plan = layer_bytes_per_token(cfg, ParallelLayout(), knobs, symbol, a.seq, a.micro_batch)
            print(f"{family:<12}{names[symbol]:<12}{got:>12.0f}{plan:>12.0f}{plan / got:>15.3f}")
    print("\nwhole forward (all layers, head included) with recomputation, qwen3_moe")
    print(f"{'setting':<40}{'measured':>12}{'saved vs none':>15}{'planned saving':>16}")
    hf = _configs(a.hidden)["qwen3_moe"]
    settings = {"none": {}, "selective [moe]": {"recompute_granularity": "selective", "recompute_modules": ("moe",)},
                "selective [core_attn]": {"recompute_granularity": "selective"},
                "full uniform 1": {"recompute_granularity": "full", "recompute_method": "uniform",
                                   "recompute_num_layers": 1}}
    base = None
    for name, opts in settings.items():
        cfg, _, total = measure(hf, a.seq, a.micro_batch, {"params_dtype": dtype, **opts})
        planned = activation_bytes(cfg, ParallelLayout(), dataclasses.replace(knobs, **opts),
                                   Batch(a.micro_batch, a.seq), 0)
        planned.pop("activations.recompute_window", None)
        plan = sum(planned.values())
        if base is None:
            base = (total, plan)
        print(f"{name:<40}{total / tokens:>12.0f}{base[0] - total:>15}{base[1] - plan:>16}")


if __name__ == "__main__":
    main()
