"""The memory plan (train/memory_plan.py) against what megatron-core really allocates and saves: parameter, grad
and optimizer bytes equal the DDP buffers and distributed-optimizer shards of tiny Qwen3-Next, Qwen3-MoE and
Mixtral models at TP2, EP2, PP2 and DP2; saved activations per layer type are within 15% of saved-tensor hooks, and
recomputation lowers them as planned; the memory knobs reach TransformerConfig and DDP's config."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from megatron_slim.errors import UserError
from megatron_slim.runtime.layout import ParallelLayout
from megatron_slim.train.config import run_config_from_dict
from megatron_slim.train.memory_plan import (
    Batch,
    Knobs,
    Param,
    activation_bytes,
    buffer_layout,
    layer_bytes_per_token,
    max_owned,
    parse_memory,
    stage_parameters,
    training_state,
)
from support.dist import run_distributed
from support.workers import tiny_config

FAMILIES = ("qwen3_next", "qwen3_moe", "mixtral")
LAYOUTS = {"tp2": dict(tp=2), "ep2": dict(ep=2), "pp2": dict(pp=2), "dp2": {}}


def _allocated(rank: int, world: int, layouts: dict[str, dict], bf16: bool) -> dict:
    """Per family and layout, this rank's DDP param/grad buffer bytes and optimizer shard bytes after one step."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_slim.models.builder import BuildOptions, build_model
    from megatron_slim.runtime.distributed import init_model_parallel

    dtype = torch.bfloat16 if bf16 else torch.float32
    out: dict = {}
    for name, layout in layouts.items():
        parallel = ParallelLayout(**layout)
        init_model_parallel(parallel, seed=1)
        for family in FAMILIES:
            cfg = tiny_config(family)
            model = build_model(cfg, parallel, BuildOptions(params_dtype=dtype))
            ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
                use_distributed_optimizer=True, grad_reduce_in_fp32=True), model)
            opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, bf16=bf16, params_dtype=dtype,
                                                         use_distributed_optimizer=True), [ddp])
            buffers = ddp.buffers + ddp.expert_parallel_buffers
            ddp.zero_grad_buffer()
            for p in model.parameters():  # every shard gets a gradient: the step creates every Adam state
                p.main_grad.fill_(1e-3)
            opt.step()
            state = 0
            for o in getattr(opt, "chained_optimizers", [opt]):
                for group in o.optimizer.param_groups:
                    for p in group["params"]:
                        st = o.optimizer.state.get(p, {})
                        state += sum(st[k].nbytes for k in ("exp_avg", "exp_avg_sq") if k in st)
                        if bf16:
                            state += p.nbytes  # fp32 master shard (fp32 params are their own master)
            out[(name, family)] = {"param_buffers": sum(b.param_data.nbytes for b in buffers),
                                   "grad_buffers": sum(b.grad_data.nbytes for b in buffers), "optimizer": state,
                                   "stage": parallel_state.get_pipeline_model_parallel_rank()}
            del opt, ddp, model
    return out


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_weights_grads_and_optimizer_equal_megatron_cores_allocations(bf16: bool) -> None:
    results = run_distributed(_allocated, 2, LAYOUTS, bf16, timeout_s=300)
    knobs = Knobs(bf16=bf16)
    for (name, family), _ in results[0].items():
        cfg = tiny_config(family)
        layout = ParallelLayout(**LAYOUTS[name])
        for rank, got in enumerate(r[(name, family)] for r in results):
            st = training_state(cfg, layout, 2, got["stage"], knobs)
            where = f"{family} {name} rank {rank}"
            assert st.param_buffers == got["param_buffers"], where
            assert st.grad_buffers == got["grad_buffers"], where
        # the plan reports the data-parallel rank that owns the most: the largest shard over ranks of a stage
        for stage in {r[(name, family)]["stage"] for r in results}:
            owned = max(r[(name, family)]["optimizer"] for r in results if r[(name, family)]["stage"] == stage)
            assert training_state(cfg, layout, 2, stage, knobs).optimizer_state == owned, f"{family} {name}"


def test_stage_parameters_are_megatron_cores_at_every_layout() -> None:
    """The parameters the plan lays out are the built model's, rank by rank, in named_parameters() order."""
    results = run_distributed(_numels, 2, LAYOUTS, timeout_s=300)
    for (name, family), _ in results[0].items():
        cfg, layout = tiny_config(family), ParallelLayout(**LAYOUTS[name])
        for r in results:
            got = r[(name, family)]
            assert [p.numel for p in stage_parameters(cfg, layout, got["stage"])] == got["numels"], (family, name)
            assert [p.expert for p in stage_parameters(cfg, layout, got["stage"])] == got["expert"], (family, name)


def _numels(rank: int, world: int, layouts: dict[str, dict]) -> dict:
    from megatron.core import parallel_state

    from megatron_slim.models.builder import build_model
    from megatron_slim.runtime.distributed import init_model_parallel

    out = {}
    for name, layout in layouts.items():
        parallel = ParallelLayout(**layout)
        init_model_parallel(parallel, seed=1)
        for family in FAMILIES:
            model = build_model(tiny_config(family), parallel)
            params = list(model.parameters())
            out[(name, family)] = {"numels": [p.numel() for p in params],
                                   "expert": [not getattr(p, "allreduce", True) for p in params],
                                   "stage": parallel_state.get_pipeline_model_parallel_rank()}
    return out


def test_buffer_layout_pads_like_megatron_core() -> None:
    """Parameters start at multiples of 64, bucket ends at multiples of lcm(dp, 128), a shared embedding gets its
    own bucket, and shards own only parameter elements."""
    params = [Param("emb", 100, shared_embedding=True), Param("a", 10), Param("b", 70)]
    lay = buffer_layout(params, dp=3, bucket_size=None)
    assert lay.ranges == [(0, 70), (128, 138), (384, 484)]  # b, a, then the embedding in its own bucket
    assert lay.buckets == [(0, 384), (384, 768)] and lay.numel == 768
    assert max_owned(lay) == 170  # rank 0 owns b (70, shard [0, 128)) and the embedding (100, shard [384, 512))
    assert buffer_layout([Param("x", 5)] * 3, dp=2, bucket_size=60).buckets == [(0, 128), (128, 256)]


def _measure(rank: int, world: int, families: tuple[str, ...], seq: int, batch: int, recompute: dict) -> dict:
    from megatron_slim.models.builder import BuildOptions, build_model
    from megatron_slim.models.forward import position_ids_for
    from megatron_slim.runtime.distributed import init_model_parallel
    from megatron_slim.train.activation_probe import SavedActivations

    init_model_parallel(ParallelLayout(), seed=0)
    out = {}
    for family in families:
        cfg = tiny_config(family)
        model = build_model(cfg, ParallelLayout(), BuildOptions(**recompute))
        model.train()
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq))
        probe = SavedActivations(model)
        with probe.measure():
            model(tokens, position_ids_for(tokens), None)
        out[family] = (probe.per_layer_type(cfg.hybrid_pattern), sum(probe.by_scope.values()))
        probe.close()
    return out


LOCAL = Knobs(bf16=False, backend="local")


def test_activation_formulas_within_15_percent_of_saved_tensor_hooks() -> None:
    seq, batch = 64, 2
    measured = run_distributed(_measure, 1, FAMILIES, seq, batch, {})[0]
    for family in FAMILIES:
        cfg = tiny_config(family)
        per_type, _ = measured[family]
        for symbol, values in per_type.items():
            if symbol in ("head", "mtp"):
                continue
            plan = layer_bytes_per_token(cfg, ParallelLayout(), LOCAL, symbol, seq, batch) * seq * batch
            for got in values:
                assert abs(plan / got - 1) < 0.15, f"{family} layer {symbol}: plan {plan} measured {got}"
        if "mtp" in per_type:
            plan = activation_bytes(cfg, ParallelLayout(), LOCAL, Batch(batch, seq), 0)["activations.mtp"]
            assert abs(plan / per_type["mtp"][0] - 1) < 0.15, f"{family} MTP: plan {plan} measured {per_type['mtp']}"


@pytest.mark.parametrize("recompute", [
    {"recompute_granularity": "selective", "recompute_modules": ("moe",)},
    {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
], ids=["selective_moe", "full_uniform"])
def test_recomputation_lowers_saved_activations_as_planned(recompute: dict) -> None:
    seq, batch, family = 64, 2, "qwen3_moe"
    got = run_distributed(_measure, 1, (family,), seq, batch, {})[0][family][1]
    got_re = run_distributed(_measure, 1, (family,), seq, batch, recompute)[0][family][1]
    cfg = tiny_config(family)
    plan = sum(activation_bytes(cfg, ParallelLayout(), LOCAL, Batch(batch, seq), 0).values())
    knobs = dataclasses.replace(LOCAL, **recompute)
    planned = activation_bytes(cfg, ParallelLayout(), knobs, Batch(batch, seq), 0)
    planned.pop("activations.recompute_window", None)  # rebuilt during the backward, never saved by the forward
    plan_re = sum(planned.values())
    assert got_re < 0.8 * got and plan_re < 0.8 * plan
    saved, planned_saved = got - got_re, plan - plan_re
    assert abs(planned_saved / saved - 1) < 0.15, f"measured {got} -> {got_re}, planned {plan} -> {plan_re}"


def _config(**memory) -> dict:
    return {"model": {"checkpoint": "m"}, "data": {"blend": [[1.0, "d"]]}, "checkpoint": {"save_dir": "s"},
            "train": {"train_iters": 1}, "teacher": {"checkpoint": "t"}, "precision": {"bf16": True},
            "memory": memory}


def test_memory_knobs_reach_megatron_core() -> None:
    from megatron_slim.models.builder import transformer_config
    from megatron_slim.train.trainer import ddp_config, student_build_options, teacher_build_options

    cfg = tiny_config("qwen3_moe")
    c = run_config_from_dict(_config(recompute={"granularity": "full", "method": "block", "num_layers": 2},
                                     grad_reduce_dtype="bf16", overlap_grad_reduce=True, overlap_param_gather=True,
                                     moe_token_dispatcher="alltoall"))
    c.validate()
    t = transformer_config(cfg, ParallelLayout(ep=2, etp=1), student_build_options(c))
    assert (t.recompute_granularity, t.recompute_method, t.recompute_num_layers) == ("full", "block", 2)
    assert t.moe_token_dispatcher_type == "alltoall" and t.expert_tensor_parallel_size == 1
    assert transformer_config(cfg, ParallelLayout(), teacher_build_options(c)).recompute_granularity is None
    d = ddp_config(c)
    assert (d.grad_reduce_in_fp32, d.overlap_grad_reduce, d.overlap_param_gather) == (False, True, True)
    s = run_config_from_dict(_config(recompute={"granularity": "selective", "modules": ["moe", "core_attn"]},
                                     moe_token_dispatcher="allgather"))
    t = transformer_config(cfg, ParallelLayout(), student_build_options(s))
    assert t.recompute_granularity == "selective" and t.recompute_modules == ["moe", "core_attn"]
    assert t.moe_token_dispatcher_type == "allgather" and ddp_config(s).grad_reduce_in_fp32
    fp8 = run_config_from_dict(_config(teacher_precision="fp8"))
    opts = teacher_build_options(fp8)
    assert opts.fp8_param and opts.fp8 == "e4m3" and not student_build_options(fp8).fp8_param
    with pytest.raises(RuntimeError, match="Transformer Engine"):  # this machine has no TE: a clear refusal
        transformer_config(cfg, ParallelLayout(), opts)


@pytest.mark.parametrize("memory,message", [
    ({"recompute": {"granularity": "partial"}}, "granularity must be selective or full"),
    ({"recompute": {"granularity": "full", "method": "every"}}, "method must be uniform or block"),
    ({"recompute": {"granularity": "selective", "num_layers": 2}}, "num_layers only applies to granularity: full"),
    ({"recompute": {"granularity": "selective", "modules": ["attention"]}}, "modules ['attention'] are not"),
    ({"grad_reduce_dtype": "fp16"}, "grad_reduce_dtype must be fp32 or bf16"),
    ({"overlap_param_gather": True}, "overlap_param_gather needs memory.overlap_grad_reduce"),
    ({"moe_token_dispatcher": "deepep"}, "moe_token_dispatcher must be one of"),
    ({"teacher_precision": "int4"}, "teacher_precision must be bf16 or fp8"),
])
def test_bad_memory_knobs_are_refused_naming_the_key(memory: dict, message: str) -> None:
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run_config_from_dict(_config(**memory)).validate()


def test_gpu_memory_sizes_parse() -> None:
    assert parse_memory("80GiB") == 80 * 2**30 and parse_memory("80GB") == 80 * 10**9
    assert parse_memory("141 GB") == 141 * 10**9 and parse_memory(1024) == 1024
    for bad in ("eighty GiB", "80XB", "-1GiB"):
        with pytest.raises(ValueError, match="is not a size"):
            parse_memory(bad)


def test_plan_command_prints_the_memory_plan_against_the_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    from megatron_slim.cli import main as cli_main

    example = Path(__file__).parent.parent / "examples" / "slimqwen"
    args = ["plan", "--config", str(example / "teacher_config.json"), "--source-mtp-layers", "1", "--target",
            str(example / "target.yaml"), "--nodes", "16", "--gpus-per-node", "8", "--gpu-memory", "80GiB",
            "--micro-batch", "1", "--seq-len", "4096", "--global-batch", "1024", "--json"]
    assert cli_main(args + ["--layout", "tp=1,pp=1,ep=8"]) == 0
    single = json.loads(capsys.readouterr().out)["stages"][0]
    assert cli_main(args + ["--layout", "tp=1,pp=4,ep=8", "--recompute", "selective"]) == 0
    piped = json.loads(capsys.readouterr().out)["stages"][0]
    assert single["fits"] is False and piped["fits"] is True
    assert single["total_bytes"] == sum(single["per_gpu_bytes"].values())
    # four pipeline stages hold about a quarter of the layers each (the first also the embedding)
    for key in ("student_weights", "grad_buffers", "teacher_weights"):
        assert 3 < single["per_gpu_bytes"][key] / piped["per_gpu_bytes"][key] <= 4, key
    assert cli_main(args[:-1] + ["--layout", "tp=1,pp=4,ep=8"]) == 0
    assert "teacher_weights" in capsys.readouterr().out
    assert cli_main(args + ["--layout", "tp=3,ep=8"]) == 2  # 128 GPUs are not a multiple of tp*pp*cp = 3
