"""Plan a compression: from an importance file and a target, write the plan that `prune` applies (kept layers,
hidden channels, experts and how the others merge into them, neurons, query groups, GDN heads), and print the
parameter accounting of source and student.

With --config instead of --importance only the accounting is computed: size a student before calibration.
With --layout (and --nodes/--gpus-per-node, --micro-batch, --seq-len) it also prints the per-GPU memory plan of
distilling the student from the source at that layout (train/memory_plan.py), against --gpu-memory.
Target fields come from --target YAML (see examples/slimqwen/target.yaml) and/or the flags below (flags win);
sizes left out keep the source's value. The target is validated against the source before anything is loaded.
"""
from __future__ import annotations

import argparse

from megatron_slim.runtime.outputs import Output

HELP = "importance + target -> compression plan, with parameter accounting (--config: accounting only)"

# (flag dest, type, help) of the target fields settable from the command line.
_TARGET_FLAGS: list[tuple[str, type, str]] = [
    ("num_layers", int, "decoder layers to keep (Qwen3-Next: keeps the full/linear attention ratio)"),
    ("hidden_size", int, "hidden channels to keep"),
    ("num_experts", int, "routed experts per MoE layer"),
    ("topk", int, "routed experts per token"),
    ("moe_ffn_hidden_size", int, "FFN width of each routed expert"),
    ("shared_expert_ffn_hidden_size", int, "FFN width of the shared expert"),
    ("dense_ffn_hidden_size", int, "FFN width of dense MLP layers"),
    ("query_groups", int, "attention query groups to keep (each with all its query heads)"),
    ("gdn_key_heads", int, "Gated DeltaNet key heads to keep (each with its value heads)"),
    ("mtp_layers", int, "MTP depths to keep (0 drops MTP)"),
    ("preserve_ratio", float, "share of the target expert slots kept intact; the rest are merge bases (1: plain "
                              "pruning, 0: every slot merges; default 0.5)"),
    ("tp", int, "tensor-parallel size the student must fit (divisibility check; default 1)"),
    ("ep", int, "expert-parallel size the student must fit (default 1)"),
    ("pp", int, "pipeline-parallel size the student must fit (default 1)"),
]


OUTPUTS = (Output("out", "file", inputs=("importance", "config", "target")),
           Output("plots", "workdir", inputs=("importance",), overwrite=None))  # adds its three PNGs

def add_arguments(p: argparse.ArgumentParser) -> None:
    from megatron_slim.compress.target import DEPTH_CRITERIA, EXPERT_CRITERIA, MERGE_SIMILARITIES, ROUTERS

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--importance", help="importance file from `megatron-slim importance` (plans need one)")
    src.add_argument("--config", help="HF config.json or checkpoint directory: accounting only, no plan")
    p.add_argument("--source-mtp-layers", type=int, default=argparse.SUPPRESS,
                   help="with --config: MTP depths of that model (HF configs do not declare them; Qwen3-Next "
                        "checkpoints hold 1); default 0")
    p.add_argument("--target", help="target YAML (fields as the flags below, snake_case)")
    p.add_argument("--out", help="plan JSON to write (required with --importance)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--plots", metavar="DIR", help="write experts.png, layers.png and hidden.png here (needs "
                                                  "--importance)")
    p.add_argument("--json", action="store_true", help="print one JSON object (accounting, plan path) instead of text")
    m = p.add_argument_group("memory plan (with --layout): per-GPU bytes of distilling the student from the source")
    m.add_argument("--layout", help="parallel layout, e.g. tp=1,pp=4,ep=8 (etp= and cp= too)")
    m.add_argument("--nodes", type=int, default=1, help="nodes of the distillation job")
    m.add_argument("--gpus-per-node", type=int, default=8, help="GPUs of each node")
    m.add_argument("--gpu-memory", help="memory of one GPU, e.g. 80GiB; the plan then says whether it fits")
    m.add_argument("--micro-batch", type=int, default=1, help="sequences per forward micro-batch")
    m.add_argument("--seq-len", type=int, default=4096, help="tokens per training sequence")
    m.add_argument("--global-batch", type=int, help="sequences per step (bounds the micro-batches a pipeline "
                                                    "stage keeps; default: as many as the pipeline needs)")
    m.add_argument("--recompute", choices=("none", "selective", "full"), default="none",
                   help="selective: core_attn and moe; full: uniform, one layer per chunk")
    m.add_argument("--grad-reduce-dtype", choices=("fp32", "bf16"), default="fp32",
                   help="dtype of the gradient buffers the data-parallel reduction runs in (bf16: half their bytes)")
    m.add_argument("--teacher-precision", choices=("bf16", "fp8"), default="bf16",
                   help="precision of the frozen teacher's weights")
    m.add_argument("--fp32", action="store_true", help="fp32 weights (default: bf16 training)")
    t = p.add_argument_group("target (flags override the YAML; sizes unset in both keep the source's)")
    for dest, kind, text in _TARGET_FLAGS:
        t.add_argument("--" + dest.replace("_", "-"), dest=dest, type=kind, default=argparse.SUPPRESS, help=text)
    t.add_argument("--expert-criterion", choices=EXPERT_CRITERIA, default=argparse.SUPPRESS,
                   help="expert ranking statistic (YAML default: frequency)")
    t.add_argument("--depth-criterion", choices=DEPTH_CRITERIA, default=argparse.SUPPRESS,
                   help="layer ranking statistic (YAML default: block_influence)")
    t.add_argument("--merge-similarity", choices=MERGE_SIMILARITIES, default=argparse.SUPPRESS,
                   help="how a dropped expert picks its base (YAML default: router_cosine)")
    t.add_argument("--router", choices=ROUTERS, default=argparse.SUPPRESS,
                   help="merged slot's router row: the base's or the weighted average (YAML default: keep)")


def _importance_model(path: str):
    """The source ModelConfig from an importance file's header, without reading its tensors."""
    import json

    from safetensors import safe_open

    from megatron_slim.errors import UserError
    from megatron_slim.models.config import ModelConfig

    try:
        with safe_open(path, "pt") as f:
            header = json.loads((f.metadata() or {})["header"])
        return ModelConfig.from_json(header["model_config"])
    except FileNotFoundError:
        raise
    except Exception as e:  # any malformed file: one clear line, not a traceback
        raise UserError(f"{path}: not a megatron-slim importance file ({type(e).__name__}: {e})") from e


def _flag_overrides(args: argparse.Namespace) -> dict:
    names = [d for d, _, _ in _TARGET_FLAGS] + ["expert_criterion", "depth_criterion", "merge_similarity", "router"]
    return {n: getattr(args, n, None) for n in names}


def _memory_plans(args: argparse.Namespace, teacher, student) -> list:
    """The memory plan of distilling `student` from `teacher` at the flags' layout: one stage, 'distill'."""
    from megatron_slim.errors import UserError
    from megatron_slim.runtime.layout import ParallelLayout
    from megatron_slim.train.memory_plan import Batch, Knobs, StageSetup, parse_memory, plan_stage

    layout = ParallelLayout.parse(args.layout)
    try:
        world = args.nodes * args.gpus_per_node
        layout.validate_world(world)
        gpu = parse_memory(args.gpu_memory) if args.gpu_memory else None
    except ValueError as e:
        raise UserError(f"--layout {args.layout}: {e}") from None
    recompute = {"none": {}, "selective": {"recompute_granularity": "selective",
                                           "recompute_modules": ("core_attn", "moe")},
                 "full": {"recompute_granularity": "full", "recompute_method": "uniform",
                          "recompute_num_layers": 1}}[args.recompute]
    knobs = Knobs(bf16=not args.fp32, grad_reduce_dtype=args.grad_reduce_dtype,
                  teacher_precision=args.teacher_precision, **recompute)
    dp = layout.dp(world)
    micro = (args.global_batch // (args.micro_batch * dp)) if args.global_batch else 1 << 30
    setup = StageSetup("distill", student, teacher, layout, world, Batch(args.micro_batch, args.seq_len, micro),
                       knobs, gpu)
    return [plan_stage(setup)]


def run(args: argparse.Namespace) -> int:
    from megatron_slim.compress.accounting import account, format_table
    from megatron_slim.compress.target import TargetSpec
    from megatron_slim.errors import UserError
    from megatron_slim.runtime import json_out

    overrides = _flag_overrides(args)
    spec = (TargetSpec.from_yaml(args.target) if args.target else TargetSpec()).with_overrides(**overrides)
    plan_path, plots, plan = None, [], None
    if args.importance:
        if not args.out:
            raise UserError("--out PLAN is required with --importance")
        if hasattr(args, "source_mtp_layers"):
            raise UserError("--source-mtp-layers only applies to --config (the importance file knows its model)")
        source = _importance_model(args.importance)
        spec.validate(source)

        from megatron_slim.compress.importance_file import Importance
        from megatron_slim.compress.planner import make_plan
        from megatron_slim.runtime.outputs import claim_output_file

        with claim_output_file(args.out, inputs=[args.importance], overwrite=args.overwrite) as staging:
            imp = Importance.load(args.importance)
            plan = make_plan(imp, spec)
            plan.save(staging)
        plan_path, target = args.out, plan.target
        if args.plots:
            from megatron_slim.compress.plots import write_plots

            plots = [str(p) for p in write_plots(imp, spec, plan, args.plots)]
    else:
        if args.out or args.plots:
            raise UserError("--out and --plots need --importance (with --config the command only does accounting)")
        from megatron_slim.models.registry import model_config_from_hf

        source = model_config_from_hf(args.config, mtp_num_layers=getattr(args, "source_mtp_layers", 0))
        spec.validate(source)
        has_target = args.target or any(v is not None for v in overrides.values())
        target = spec.target_config(source, spec.placeholder_layers(source)) if has_target else None
    before, after = account(source), account(target) if target else None
    memory = _memory_plans(args, source, target or source) if args.layout else None
    if args.json:
        out = {"source": before.to_json(), "target": after.to_json() if after else None,
               "target_pattern": target.hybrid_pattern if target else None, "plan": plan_path, "plots": plots}
        if memory is not None:
            out["stages"] = [p.to_json() for p in memory]
        json_out.emit(out)
        return 0
    print(format_table(before, after))
    if memory is not None:
        from megatron_slim.train.memory_plan import format_plans

        print()
        print(format_plans(memory))
    if target:
        print(f"student layer pattern: {target.hybrid_pattern}")
    if plan:
        merged = sum(len(slot) > 1 for slots in plan.experts.values() for slot in slots)
        print(f"kept layers {plan.layers}; {merged} merged expert slots over {len(plan.experts)} MoE layers")
        print(f"wrote plan {plan_path}")
    for path in plots:
        print(f"wrote {path}")
    return 0
