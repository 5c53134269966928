"""Per-GPU memory plan of a training or distillation stage, from configs alone (pure arithmetic, no torch).

For a student (and its frozen teacher), a parallel layout, a batch shape and the run config's `memory` knobs, the
bytes one GPU holds, by component, on the pipeline stage that needs the most:

- teacher_weights: the frozen teacher's parameters in its precision (bf16; fp8 keeps its linear weights in one
  byte with Transformer Engine's fp8 parameters). The teacher is outside DDP (no grad, no optimizer state).
- student_weights / grad_buffers: megatron-core's DistributedDataParallel copies the trainable parameters into
  contiguous param and grad buffers, one per (param dtype, grad dtype, expert-parallel) key
  (`distributed/param_and_grad_buffer.py:group_params_for_buffers`); with the distributed optimizer each buffer
  is laid out by `DistributedOptimizer._compute_per_buffer_param_layout` (`optimizer/distrib_optimizer.py`): in
  reverse parameter order, every parameter starts at a multiple of 64 elements (`param_layout.pad_param_start`),
  a bucket closes once it holds `bucket_size` elements (overlap_grad_reduce on the first pipeline stage only,
  bucket_size = max(4e7, 1e6 * dp): `distributed_data_parallel.py`) or at a `shared_embedding` parameter, and
  its end is padded to lcm(dp, 128) (`param_layout.pad_bucket_end`). Dense buffers shard over the data-parallel
  group (dp * cp ranks), expert buffers over the expert-data-parallel group (world / (etp * ep * pp)).
- optimizer_state: each bucket is cut into dp equal shards (`_build_model_gbuf_range`); a rank keeps, for the
  parameter elements inside its shard, fp32 Adam moments (2 x 4 bytes) and, for bf16 parameters, an fp32 master
  copy (4 bytes); fp32 parameters are their own master. We report the rank that owns the most elements.
  With bf16 gradients the optimizer step also makes an fp32 copy of the shard's gradients (main_grad_copy).
- activations.<type>: bytes saved for backward per layer type, per micro-batch in flight times the micro-batches
  a 1F1B pipeline stage keeps (min(pp - stage, micro-batches per step)); coefficients from saved-tensor hooks
  (`train/activation_probe.py`, `bench/bench_memory.py`), checked in tests/test_memory_plan.py.
- logits_kd: the student's vocab-parallel logits (main head and each MTP depth), the teacher's logits, and the
  logits' gradient while the loss backward runs (last stage only).
- teacher_forward: the largest working set of one teacher layer's no-grad forward (freed layer by layer).
- cuda_context_comm: a stated allowance for the CUDA context, NCCL communicators and cuBLAS/TE workspaces.

A stage fits when its total is at most (1 - FRAGMENTATION_MARGIN) of the GPU's memory: the caching allocator
fragments and expert loads vary from step to step, so the last 10% is never planned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable

from megatron_slim.models.config import ATTENTION, DENSE_MLP, GDN, MOE, ModelConfig
from megatron_slim.runtime.layout import ParallelLayout

GiB = 2**30
CUDA_CONTEXT_COMM_BYTES = 3 * GiB  # CUDA context ~0.6 GiB, NCCL groups (dp, tp, pp, ep, edp) ~1.5 GiB, workspaces
FRAGMENTATION_MARGIN = 0.10
GDN_CHUNK = 64  # chunk length of the Gated DeltaNet kernels (fla's and the CPU reference)
RECOMPUTE_MODULES = ("core_attn", "moe_act", "layernorm", "mlp", "moe", "shared_experts")
LAYER_KINDS = {GDN: "gdn", ATTENTION: "attention", MOE: "moe", DENSE_MLP: "dense_mlp"}


@dataclass(frozen=True)
class Knobs:
    """The memory-relevant settings of a run (train/config.py MemorySection, PrecisionSection)."""

    bf16: bool = True
    recompute_granularity: str | None = None  # None | selective | full
    recompute_method: str | None = None  # full: uniform | block
    recompute_num_layers: int | None = None  # full: layers per recomputed chunk (uniform) or recomputed (block)
    recompute_modules: tuple[str, ...] = ("core_attn",)  # selective (megatron-core's default)
    grad_reduce_dtype: str = "fp32"  # fp32 | bf16
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    moe_token_dispatcher: str = "alltoall"  # alltoall | allgather | flex
    teacher_precision: str = "bf16"  # bf16 | fp8
    backend: str = "transformer_engine"  # transformer_engine (GPU) | local (torch-native: CPU, GPUs without TE)


@dataclass(frozen=True)
class Batch:
    micro_batch: int
    seq_len: int
    num_microbatches: int = 1 << 30  # per step and data-parallel rank; bounds the micro-batches a stage keeps


@dataclass(frozen=True)
class Param:
    name: str
    numel: int
    expert: bool = False  # megatron-core's allreduce=False: its own buffer, sharded over expert-DP
    shared_embedding: bool = False  # own bucket (DistributedOptimizer._does_param_require_new_bucket)
    linear: bool = False  # a GEMM weight (fp8-capable)


# ---- parameters, as megatron-core's HybridModel holds them on one rank ----------------------------------------
def _div(value: int, by: int, what: str) -> int:
    if value % by:
        raise ValueError(f"{what}={value} is not divisible by {by}")
    return value // by


def _attention_params(cfg: ModelConfig, tp: int, prefix: str) -> list[Param]:
    d = cfg.head_dim
    heads = _div(cfg.num_attention_heads, tp, "num_attention_heads")
    groups = max(cfg.num_query_groups // tp, 1)
    q = heads * d * (2 if cfg.attention_output_gate else 1)
    out = [Param(prefix + "input_layernorm", cfg.hidden_size),
           Param(prefix + "linear_proj", cfg.hidden_size * heads * d, linear=True),
           Param(prefix + "linear_qkv", (q + 2 * groups * d) * cfg.hidden_size, linear=True)]
    if cfg.qk_layernorm:
        out += [Param(prefix + "q_layernorm", d), Param(prefix + "k_layernorm", d)]
    return out


def _gdn_params(cfg: ModelConfig, tp: int, prefix: str) -> list[Param]:
    h = cfg.hidden_size
    hk = _div(cfg.linear_num_key_heads, tp, "linear_num_key_heads")
    hv = _div(cfg.linear_num_value_heads, tp, "linear_num_value_heads")
    kd, vd = hk * cfg.linear_key_head_dim, hv * cfg.linear_value_head_dim
    return [Param(prefix + "input_layernorm", h), Param(prefix + "dt_bias", hv), Param(prefix + "A_log", hv),
            Param(prefix + "in_proj", (2 * kd + 2 * vd + 2 * hv) * h, linear=True),
            Param(prefix + "conv1d", (2 * kd + vd) * cfg.linear_conv_kernel_dim),
            Param(prefix + "out_norm", cfg.linear_value_head_dim), Param(prefix + "out_proj", h * vd, linear=True)]


def _moe_params(cfg: ModelConfig, layout: ParallelLayout, prefix: str) -> list[Param]:
    h, etp, tp = cfg.hidden_size, layout.expert_tp, layout.tp
    # tensor_parallel/layers.py: experts use the expert groups when ep > 1 or etp != tp
    expert = layout.ep > 1 or etp != tp
    f = _div(cfg.moe_ffn_hidden_size, etp, "moe_ffn_hidden_size")
    out = [Param(prefix + "pre_mlp_layernorm", h), Param(prefix + "router", cfg.num_experts * h)]
    for e in range(_div(cfg.num_experts, layout.ep, "num_experts")):
        out += [Param(f"{prefix}experts.{e}.linear_fc1", 2 * f * h, expert, linear=True),
                Param(f"{prefix}experts.{e}.linear_fc2", h * f, expert, linear=True)]
    if cfg.shared_expert_ffn_hidden_size:
        sf = _div(cfg.shared_expert_ffn_hidden_size, tp, "shared_expert_ffn_hidden_size")
        if cfg.shared_expert_gate:
            out.append(Param(prefix + "shared_experts.gate_weight", h))
        out += [Param(prefix + "shared_experts.linear_fc1", 2 * sf * h, linear=True),
                Param(prefix + "shared_experts.linear_fc2", h * sf, linear=True)]
    return out


def _dense_params(cfg: ModelConfig, tp: int, prefix: str) -> list[Param]:
    f = _div(cfg.dense_ffn_hidden_size, tp, "dense_ffn_hidden_size")
    h = cfg.hidden_size
    return [Param(prefix + "pre_mlp_layernorm", h), Param(prefix + "linear_fc1", 2 * f * h, linear=True),
            Param(prefix + "linear_fc2", h * f, linear=True)]


def _layer_params(cfg: ModelConfig, layout: ParallelLayout, symbol: str, prefix: str) -> list[Param]:
    if symbol == ATTENTION:
        return _attention_params(cfg, layout.tp, prefix)
    if symbol == GDN:
        return _gdn_params(cfg, layout.tp, prefix)
    if symbol == MOE:
        return _moe_params(cfg, layout, prefix)
    return _dense_params(cfg, layout.tp, prefix)


def stage_symbols(cfg: ModelConfig, pp: int, stage: int) -> str:
    """The hybrid layer symbols pipeline stage `stage` holds (models/builder.py pipeline_pattern: equal shares)."""
    main = cfg.hybrid_pattern.split("/")[0]
    per = len(main) // pp
    return main[stage * per:(stage + 1) * per]


def stage_parameters(cfg: ModelConfig, layout: ParallelLayout, stage: int) -> list[Param]:
    """This pipeline stage's parameters in HybridModel's `named_parameters()` order (the order the buffers are
    laid out from): embedding, decoder layers, final norm, MTP depths, output layer."""
    first, last = stage == 0, stage == layout.pp - 1
    h, vocab = cfg.hidden_size, _div(cfg.vocab_size, layout.tp, "vocab_size")
    mtp = cfg.mtp_num_layers > 0 and last
    # language_module.setup_embeddings_and_output_layer: with pp > 1 and tied weights or MTP, the copies of the
    # embedding on the first and last stage are `shared_embedding` (their own bucket)
    shared = layout.pp > 1 and (cfg.tie_word_embeddings or cfg.mtp_num_layers > 0)
    out: list[Param] = []
    if first or mtp:
        out.append(Param("embedding", vocab * h, shared_embedding=shared and (not last or not first)))
    for i, symbol in enumerate(stage_symbols(cfg, layout.pp, stage)):
        out += _layer_params(cfg, layout, symbol, f"layers.{i}.")
    if last:
        out.append(Param("final_norm", h))
        for k in range(cfg.mtp_num_layers):
            p = f"mtp.{k}."
            out += [Param(p + "enorm", h), Param(p + "hnorm", h),
                    Param(p + "eh_proj", _div(h, layout.tp, "hidden_size") * 2 * h, linear=True)]
            for j, symbol in enumerate(cfg.mtp_layer_pattern):
                out += _layer_params(cfg, layout, symbol, f"{p}layers.{j}.")
            out.append(Param(p + "final_layernorm", h))
        if not cfg.tie_word_embeddings:
            out.append(Param("output_layer", vocab * h))
        elif not first:  # tied: the last stage keeps a copy of the embedding as its output weight
            out.append(Param("output_layer", vocab * h, shared_embedding=not mtp))
    return out


# ---- megatron-core's buffer layout and optimizer shards -----------------------------------------------------
def _pad(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


@dataclass(frozen=True)
class BufferLayout:
    """One param/grad buffer: its padded size, bucket ranges and each parameter's [start, end)."""

    numel: int
    buckets: list[tuple[int, int]]
    ranges: list[tuple[int, int]]
    dp: int


def buffer_layout(params: list[Param], dp: int, bucket_size: int | None) -> BufferLayout:
    """optimizer/distrib_optimizer.py `_compute_per_buffer_param_layout` (pad_for_high_nccl_busbw off)."""
    end_divisor = math.lcm(dp, 128)  # param_layout.bucket_end_divisor
    buckets: list[tuple[int, int]] = []
    ranges: list[tuple[int, int]] = []
    start = bucket_start = 0
    open_params = 0

    def close(end: int) -> int:
        buckets.append((bucket_start, _pad(end, end_divisor)))
        return buckets[-1][1]

    for p in reversed(params):
        start = _pad(start, 64)  # param_layout.pad_param_start
        if p.shared_embedding and open_params:
            bucket_start = start = close(start)
            open_params = 0
        end = start + p.numel
        ranges.append((start, end))
        open_params += 1
        if (bucket_size is not None and end - bucket_start >= bucket_size) or p.shared_embedding:
            bucket_start = start = close(end)
            open_params = 0
        else:
            start = end
    if open_params:
        close(start)
    return BufferLayout(buckets[-1][1] if buckets else 0, buckets, ranges, dp)


def max_owned(layout: BufferLayout) -> int:
    """The most parameter elements any data-parallel rank owns (its optimizer shard, padding excluded)."""
    owned = [0] * layout.dp
    ranges = sorted(layout.ranges)
    for b_start, b_end in layout.buckets:
        size = (b_end - b_start) // layout.dp
        for r in range(layout.dp):
            lo, hi = b_start + r * size, b_start + (r + 1) * size
            owned[r] += sum(max(0, min(hi, e) - max(lo, s)) for s, e in ranges if s < hi and e > lo)
    return max(owned) if owned else 0


@dataclass(frozen=True)
class StateBytes:
    """The DDP and optimizer allocations of one rank (what tests compare with megatron-core's)."""

    param_buffers: int
    grad_buffers: int
    optimizer_state: int
    main_grad_copy: int
    params: int  # trainable elements (unpadded)


def training_state(cfg: ModelConfig, layout: ParallelLayout, world: int, stage: int, knobs: Knobs) -> StateBytes:
    params = stage_parameters(cfg, layout, stage)
    dp = layout.dp(world) * layout.cp
    edp = world // (layout.expert_tp * layout.ep * layout.pp)
    bucket = None
    if knobs.overlap_grad_reduce and stage == 0:  # distributed_data_parallel.py: pp ranks > 0 get no buckets
        bucket = max(40_000_000, 1_000_000 * layout.dp(world))
    p_bytes = 2 if knobs.bf16 else 4
    g_bytes = 4 if knobs.grad_reduce_dtype == "fp32" or not knobs.bf16 else 2
    totals = StateBytes(0, 0, 0, 0, 0)
    for expert, size in ((False, dp), (True, edp)):
        group = [p for p in params if p.expert == expert]
        if not group:
            continue
        lay = buffer_layout(group, size, bucket)
        owned = max_owned(lay)
        totals = StateBytes(
            totals.param_buffers + lay.numel * p_bytes, totals.grad_buffers + lay.numel * g_bytes,
            totals.optimizer_state + owned * (8 + (4 if knobs.bf16 else 0)),
            totals.main_grad_copy + (owned * 4 if g_bytes == 2 else 0), totals.params + sum(p.numel for p in group))
    return totals


def teacher_weight_bytes(cfg: ModelConfig, layout: ParallelLayout, stage: int, precision: str, bf16: bool) -> int:
    """The frozen teacher's parameters on this stage (no buffers: it is not trained)."""
    dense = 2 if bf16 or precision != "fp32" else 4
    total = 0
    for p in stage_parameters(cfg, layout, stage):
        total += p.numel * (1 if precision == "fp8" and p.linear else dense)
    return total


# ---- activations ----------------------------------------------------------------------------------------------
def _moe_elements(cfg: ModelConfig, layout: ParallelLayout, knobs: Knobs) -> dict[str, float]:
    """Per token, by part (elements of the activation dtype unless the key says bytes)."""
    h, k, e = cfg.hidden_size, cfg.topk, cfg.num_experts
    f = cfg.moe_ffn_hidden_size / layout.expert_tp
    sf = cfg.shared_expert_ffn_hidden_size / layout.tp
    parts = {"layernorm": 3 * h,  # norm input, normalised input, output (router / experts / shared expert input)
             "router_bytes": 4 + 20 * k + 5 * e,  # rstd, top-k ids (int64) and probs (fp32), routing map, probs map
             "dispatch": k * h,  # permuted tokens (one copy per routed slot)
             "experts": k * 6 * f,  # fc1 output (2f), SwiGLU pieces (3f), activation output (f) per routed slot
             "probs_bytes": 4 * k}
    if knobs.moe_token_dispatcher == "allgather" and layout.ep * layout.tp > 1:
        parts["dispatch"] += layout.ep * layout.tp * h  # every rank's tokens, gathered over the EP x TP group
    if sf:
        parts["shared_experts"] = 5 * sf + (h + 1 if cfg.shared_expert_gate else 0)
    if knobs.backend == "transformer_engine":
        parts["layernorm"] = 2 * h  # TE RMSNorm keeps its input and rstd, the output is the GEMMs' input
        parts["experts"] = k * 3 * f  # grouped GEMM: fc1 output (2f) and the fused SwiGLU output (f)
        if sf:
            parts["shared_experts"] = 3 * sf + (h + 1 if cfg.shared_expert_gate else 0)
    return parts


def _attention_elements(cfg: ModelConfig, layout: ParallelLayout, knobs: Knobs, seq: int,
                        micro_batch: int) -> dict[str, float]:
    h, d = cfg.hidden_size, cfg.head_dim
    heads = cfg.num_attention_heads / layout.tp
    groups = max(cfg.num_query_groups / layout.tp, 1)
    gate = cfg.attention_output_gate
    qkv = heads * d * (2 if gate else 1) + 2 * groups * d
    rot = int(d * cfg.rotary_percent)
    # q/k norms keep the fused qkv output and their own outputs; RoPE keeps cos and sin of q and k per position
    parts = {"layernorm": 3 * h, "qkv": (qkv + 2 * heads * d + groups * d) if cfg.qk_layernorm else 0.0,
             "rope": 4 * rot / micro_batch, "norm_bytes": 4 + (4 * (heads + groups) if cfg.qk_layernorm else 0),
             "output": heads * d * (3 if gate else 1)}
    if knobs.backend == "local":  # megatron-core's DotProductAttention materialises scores and probabilities
        parts["core_attn"] = 3 * heads * d + heads * seq
        parts["core_attn_bytes"] = seq / micro_batch  # the causal mask, per position
    else:  # flash attention keeps q, k, v, the output and the log-sum-exp
        parts["core_attn"] = 3 * heads * d
        parts["core_attn_bytes"] = 4 * heads
    if knobs.backend == "transformer_engine":
        parts["layernorm"] = 2 * h
    return parts


def _gdn_elements(cfg: ModelConfig, layout: ParallelLayout, knobs: Knobs) -> dict[str, float]:
    h = cfg.hidden_size
    hk, hv = cfg.linear_num_key_heads / layout.tp, cfg.linear_num_value_heads / layout.tp
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    kd, vd = hk * dk, hv * dv
    c = GDN_CHUNK
    parts = {"layernorm": 3 * h, "projections": 2 * (2 * kd + vd) + vd + 5 * hv + 2 * hv * dk,
             "out_norm": 5 * vd + hv + vd}
    if knobs.backend == "local":
        # the CPU reference's chunked recurrence: per chunk three [C, C] matrices and, in its triangular solve,
        # one i x i slice for each row i < C (sum (i^2 + i) / C per token), then the inter-chunk state updates
        parts["recurrence"] = hv * (3 * c + sum(i * i + i for i in range(1, c)) / c + 4 * c + 4 * dk)
    else:  # fla's chunk kernels keep q, k (expanded to the value heads), v, g, beta and one dk x dv state per chunk;
        # TE's fused norm + in_proj keeps the norm input and output; the gated out-norm its input and output
        parts = {"layernorm": 2 * h, "projections": 2 * (2 * kd + vd) + vd + 2 * hv,
                 "recurrence": 2 * hv * dk + vd + hv * dk * dv / c, "out_norm": 2 * vd + hv}
    return parts


def _dense_elements(cfg: ModelConfig, layout: ParallelLayout, knobs: Knobs) -> dict[str, float]:
    f = cfg.dense_ffn_hidden_size / layout.tp
    norm = 2 if knobs.backend == "transformer_engine" else 3
    return {"layernorm": norm * cfg.hidden_size, "mlp": (3 if knobs.backend == "transformer_engine" else 5) * f}


def _selective(parts: dict[str, float], kind: str, modules: Iterable[str], h: int) -> dict[str, float]:
    """Drop what selective recomputation recomputes; a recomputed block keeps its input (h) instead."""
    modules = set(modules)
    out = dict(parts)
    if kind == "moe" and "moe" in modules:
        return {"layernorm": out["layernorm"], "input": 0.0}  # the MoE block keeps only the norm's output
    if kind == "dense_mlp" and "mlp" in modules:
        return {"layernorm": out["layernorm"]}
    if "core_attn" in modules and "core_attn" in out:
        out["core_attn"], out["core_attn_bytes"] = 0.0, 0.0
    if "layernorm" in modules:
        out["layernorm"] = h  # keeps the norm input; the output is recomputed
    if "moe_act" in modules and "experts" in out:
        out["experts"] *= 2 / 3  # the activation output is recomputed from fc1's
    if "shared_experts" in modules and "shared_experts" in out:
        out["shared_experts"] = 0.0
    return out


def layer_bytes_per_token(cfg: ModelConfig, layout: ParallelLayout, knobs: Knobs, symbol: str, seq: int,
                          micro_batch: int = 1, recompute: bool = True) -> float:
    """Saved activation bytes per token of one layer of this kind (on this rank), with selective recomputation
    applied when `recompute`. Tokens are a rank's micro-batch tokens; sequence parallelism (tp > 1) divides the
    parts that hold whole hidden vectors."""
    a = 2 if knobs.bf16 else 4
    kind = LAYER_KINDS[symbol]
    if symbol == ATTENTION:
        parts = _attention_elements(cfg, layout, knobs, seq, micro_batch)
    elif symbol == GDN:
        parts = _gdn_elements(cfg, layout, knobs)
    elif symbol == MOE:
        parts = _moe_elements(cfg, layout, knobs)
    else:
        parts = _dense_elements(cfg, layout, knobs)
    if recompute and knobs.recompute_granularity == "selective":
        parts = _selective(parts, kind, knobs.recompute_modules, cfg.hidden_size)
    sp = layout.tp if layout.use_sequence_parallel else 1
    total = 0.0
    for name, value in parts.items():
        scale = (1 / sp) if name in ("layernorm", "input", "dispatch") else 1.0
        total += scale * (value if name.endswith("_bytes") else value * a)
    return total


def _stage_layers(cfg: ModelConfig, layout: ParallelLayout, stage: int) -> list[str]:
    """Symbols of the stage's layers; MTP depths run on the last stage as 'mtp:' layers."""
    out = list(stage_symbols(cfg, layout.pp, stage))
    if stage == layout.pp - 1:
        out += [f"mtp:{s}" for _ in range(cfg.mtp_num_layers) for s in cfg.mtp_layer_pattern]
    return out


def activation_bytes(cfg: ModelConfig, layout: ParallelLayout, knobs: Knobs, batch: Batch,
                     stage: int) -> dict[str, int]:
    """activations.<kind> of one pipeline stage: per micro-batch times the micro-batches it keeps in flight."""
    tokens = batch.micro_batch * batch.seq_len / max(layout.cp, 1)
    a = 2 if knobs.bf16 else 4
    in_flight = min(layout.pp - stage, batch.num_microbatches)
    layers = _stage_layers(cfg, layout, stage)
    sp = layout.tp if layout.use_sequence_parallel else 1
    per_layer = [(s.startswith("mtp:"), s[-1], layer_bytes_per_token(cfg, layout, knobs, s[-1], batch.seq_len,
                                                                         batch.micro_batch))
                 for s in layers]
    out: dict[str, float] = {}
    if knobs.recompute_granularity == "full":
        n = knobs.recompute_num_layers or 1
        main = [x for x in per_layer if not x[0]]
        hidden = cfg.hidden_size * a / sp  # a recomputed chunk keeps only its input
        if knobs.recompute_method == "block":  # the first n layers of the stage are recomputed, the rest kept
            kept, recomputed = main[n:], main[:n]
            for _, symbol, b in kept:
                key = "activations." + LAYER_KINDS[symbol]
                out[key] = out.get(key, 0.0) + b * tokens * in_flight
            out["activations.recompute_inputs"] = len(recomputed) * hidden * tokens * in_flight
        else:
            chunks = math.ceil(len(main) / n)
            out["activations.recompute_inputs"] = chunks * hidden * tokens * in_flight
            # backward rebuilds one chunk at a time: its layers' activations for one micro-batch
            window = max((sum(b for _, _, b in main[i:i + n]) for i in range(0, len(main), n)), default=0.0)
            out["activations.recompute_window"] = window * tokens
        per_layer = [x for x in per_layer if x[0]]
    for is_mtp, symbol, b in per_layer:
        key = "activations.mtp" if is_mtp else "activations." + LAYER_KINDS[symbol]
        out[key] = out.get(key, 0.0) + b * tokens * in_flight
    if stage == layout.pp - 1 and cfg.mtp_num_layers:  # each depth: enorm/hnorm in/outs, the concat, eh_proj
        out["activations.mtp"] = out.get("activations.mtp", 0.0) + cfg.mtp_num_layers * (
            8 * cfg.hidden_size / sp * a * tokens * in_flight)
    if stage == layout.pp - 1:  # final norm, output layer input
        out["activations.head"] = (3 * cfg.hidden_size / sp * a + 4) * tokens
    return {k: int(v) for k, v in out.items()}


def logits_bytes(student: ModelConfig, teacher: ModelConfig | None, layout: ParallelLayout, knobs: Knobs,
                 batch: Batch, mtp_teacher: bool = False) -> int:
    """Vocab-parallel logits kept on the last stage: the student's (main + MTP depths, saved for the losses'
    backward), the teacher's (main, and its MTP depths when distilling MTP from them), and one gradient of a
    logits tensor while the losses run backward. The chunked losses (distill/losses.py) add only per-token
    vectors and one chunk of rows."""
    a = 2 if knobs.bf16 else 4
    tokens = batch.micro_batch * batch.seq_len / max(layout.cp, 1)
    shard = student.vocab_size / layout.tp
    student_logits = (1 + student.mtp_num_layers) * shard
    teacher_logits = 0.0 if teacher is None else (1 + (teacher.mtp_num_layers if mtp_teacher else 0)) * shard
    per_token = (student_logits + teacher_logits + shard) * a + 48  # + row ids, normalisers, weights per token
    return int(per_token * tokens)


def teacher_forward_bytes(teacher: ModelConfig, layout: ParallelLayout, knobs: Knobs, batch: Batch,
                          stage: int) -> int:
    """The no-grad teacher forward frees each layer's intermediates before the next: its peak is about one
    layer's working set for one micro-batch (what that layer would save, without recomputation)."""
    tokens = batch.micro_batch * batch.seq_len / max(layout.cp, 1)
    symbols = set(_stage_layers(teacher, layout, stage))
    if not symbols:
        return 0
    return int(max(layer_bytes_per_token(teacher, layout, knobs, s[-1], batch.seq_len, batch.micro_batch,
                                         recompute=False)
                   for s in symbols) * tokens)


# ---- the plan -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StagePlan:
    name: str
    per_gpu_bytes: dict[str, int]
    pipeline_stage: int
    gpu_bytes: int | None = None
    params: int = 0  # trainable elements on that rank
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.per_gpu_bytes.values())

    @property
    def usable_bytes(self) -> int | None:
        return None if self.gpu_bytes is None else int(self.gpu_bytes * (1 - FRAGMENTATION_MARGIN))

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_bytes is None else self.total_bytes <= self.usable_bytes

    @property
    def largest(self) -> str:
        return max(self.per_gpu_bytes, key=self.per_gpu_bytes.get)

    def to_json(self) -> dict:
        return {"name": self.name, "per_gpu_bytes": dict(self.per_gpu_bytes), "total_bytes": self.total_bytes,
                "fits": self.fits, "pipeline_stage": self.pipeline_stage, "gpu_bytes": self.gpu_bytes}


@dataclass(frozen=True)
class StageSetup:
    """Everything a stage's plan depends on."""

    name: str
    student: ModelConfig
    teacher: ModelConfig | None
    layout: ParallelLayout
    world: int
    batch: Batch
    knobs: Knobs
    gpu_bytes: int | None = None
    mtp_teacher: bool = False  # the teacher runs its MTP depths (loss.mtp_kd_source: mtp)


def _stage_components(s: StageSetup, stage: int) -> tuple[dict[str, int], int]:
    st = training_state(s.student, s.layout, s.world, stage, s.knobs)
    comp: dict[str, int] = {}
    if s.teacher is not None:
        comp["teacher_weights"] = teacher_weight_bytes(s.teacher, s.layout, stage, s.knobs.teacher_precision,
                                                       s.knobs.bf16)
    comp["student_weights"] = st.param_buffers
    comp["grad_buffers"] = st.grad_buffers
    comp["optimizer_state"] = st.optimizer_state
    if st.main_grad_copy:
        comp["main_grad_copy"] = st.main_grad_copy
    comp.update(activation_bytes(s.student, s.layout, s.knobs, s.batch, stage))
    if stage == s.layout.pp - 1:
        comp["logits_kd"] = logits_bytes(s.student, s.teacher, s.layout, s.knobs, s.batch, s.mtp_teacher)
    if s.teacher is not None:
        comp["teacher_forward"] = teacher_forward_bytes(s.teacher, s.layout, s.knobs, s.batch, stage)
    comp["cuda_context_comm"] = CUDA_CONTEXT_COMM_BYTES
    return comp, st.params


def plan_stage(s: StageSetup) -> StagePlan:
    """The plan of the pipeline stage with the largest total (the one that runs out first)."""
    best: StagePlan | None = None
    for stage in range(s.layout.pp):
        comp, params = _stage_components(s, stage)
        plan = StagePlan(s.name, comp, stage, s.gpu_bytes, params)
        if best is None or plan.total_bytes > best.total_bytes:
            best = plan
    return best


def alternatives(s: StageSetup, limit: int = 4) -> list[tuple[str, int]]:
    """The cheapest changes that make the stage fit, each with its new total: first the knobs that cost only
    compute (bf16 gradients, selective MoE recomputation, full recomputation), then more pipeline or expert
    parallelism (fewer data-parallel replicas on the same GPUs), alone and combined with recomputation."""
    if s.gpu_bytes is None:
        return []
    k, lay = s.knobs, s.layout
    candidates: list[tuple[str, StageSetup]] = []
    if k.bf16 and k.grad_reduce_dtype != "bf16":
        candidates.append(("memory.grad_reduce_dtype: bf16", replace(s, knobs=replace(k, grad_reduce_dtype="bf16"))))
    selective = replace(k, recompute_granularity="selective", recompute_method=None, recompute_num_layers=None,
                        recompute_modules=("core_attn", "moe"))
    full = replace(k, recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if k.recompute_granularity is None:
        candidates.append(("memory.recompute: {granularity: selective, modules: [core_attn, moe]}",
                           replace(s, knobs=selective)))
    if k.recompute_granularity != "full":
        candidates.append(("memory.recompute: {granularity: full, method: uniform, num_layers: 1}",
                           replace(s, knobs=full)))
    layouts = []
    for pp in (2, 4, 8):
        new = replace(lay, pp=lay.pp * pp)
        if _layout_ok(s.student, s.teacher, new, s.world):
            layouts.append((f"parallel.pp: {new.pp}", new))
    for ep in (2, 4):
        new = replace(lay, ep=lay.ep * ep)
        if _layout_ok(s.student, s.teacher, new, s.world):
            layouts.append((f"parallel.ep: {new.ep}", new))
    for text, new in layouts:
        candidates.append((text, replace(s, layout=new)))
        candidates.append((f"{text} + full recompute", replace(s, layout=new, knobs=full)))
    found = []
    for text, cand in candidates:
        total = plan_stage(cand).total_bytes
        if total <= s.gpu_bytes * (1 - FRAGMENTATION_MARGIN):
            found.append((text, total))
    return found[:limit]


def _layout_ok(student: ModelConfig, teacher: ModelConfig | None, layout: ParallelLayout, world: int) -> bool:
    try:
        layout.validate_world(world)
        for cfg in (student, teacher):
            if cfg is not None:
                if len(cfg.hybrid_pattern.split("/")[0]) % layout.pp or cfg.num_layers % layout.pp:
                    return False
                for stage in range(layout.pp):
                    stage_parameters(cfg, layout, stage)
    except ValueError:
        return False
    return True


def gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def format_plans(plans: list[StagePlan]) -> str:
    """One column per stage plan, one row per component, GiB per GPU; the total against the GPU's memory."""
    names = list(dict.fromkeys(k for p in plans for k in p.per_gpu_bytes))
    width = max(max(len(p.name) for p in plans) + 2, 12)
    head = f"{'per GPU (GiB)':<30}" + "".join(f"{p.name:>{width}}" for p in plans)
    lines = [head, "-" * len(head)]
    for n in names:
        lines.append(f"{n:<30}" + "".join(f"{(gib(p.per_gpu_bytes[n]) if n in p.per_gpu_bytes else '-'):>{width}}"
                                          for p in plans))
    lines.append("-" * len(head))
    lines.append(f"{'total':<30}" + "".join(f"{gib(p.total_bytes):>{width}}" for p in plans))
    lines.append(f"{'pipeline stage':<30}" + "".join(f"{p.pipeline_stage:>{width}}" for p in plans))
    if any(p.gpu_bytes for p in plans):
        lines.append(f"{'usable (90% of the GPU)':<30}" + "".join(
            f"{(gib(p.usable_bytes) if p.gpu_bytes else '-'):>{width}}" for p in plans))
        lines.append(f"{'fits':<30}" + "".join(
            f"{('yes' if p.fits else 'NO') if p.gpu_bytes else '-':>{width}}" for p in plans))
    return "\n".join(lines)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str | int | float) -> int:
    """'80GiB', '80GB', '81559MiB' or a number of bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    s = str(text).strip().lower().replace(" ", "")
    number = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value <= 0:
        raise ValueError(f"GPU memory {text!r} is not a size such as 80GiB, 80GB or 141GB")
    return int(value * _UNITS[unit])


def knobs_of(run_config, backend: str = "transformer_engine") -> Knobs:
    """The plan's knobs from a run config (train/config.py RunConfig): its precision and memory section."""
    m = run_config.memory
    rk = m.recompute_kwargs()
    dispatcher = "alltoall" if m.moe_token_dispatcher == "auto" and backend == "transformer_engine" else (
        "allgather" if m.moe_token_dispatcher == "auto" else m.moe_token_dispatcher)
    return Knobs(bf16=run_config.precision.bf16, recompute_granularity=rk.get("recompute_granularity"),
                 recompute_method=rk.get("recompute_method"), recompute_num_layers=rk.get("recompute_num_layers"),
                 recompute_modules=tuple(rk.get("recompute_modules", ("core_attn",))),
                 grad_reduce_dtype=m.grad_reduce_dtype, overlap_grad_reduce=m.overlap_grad_reduce,
                 overlap_param_gather=m.overlap_param_gather, moe_token_dispatcher=dispatcher,
                 teacher_precision=m.teacher_precision, backend=backend)


def setup_of(name: str, run_config, student: ModelConfig, teacher: ModelConfig | None, world: int,
             gpu_bytes: int | None, backend: str = "transformer_engine") -> StageSetup:
    """The StageSetup of a run config's distillation, with the teacher the trainer would build (none when no
    loss term reads it; its MTP depths only when the student's MTP heads distil from them)."""
    c = run_config
    layout = c.parallel
    loss = c.loss
    mtp_teacher = loss.mtp_kd_source == "mtp" and loss.mtp_kd_weight > 0 and student.mtp_num_layers > 0
    used = loss.kd_weight > 0 or (loss.mtp_kd_weight > 0 and student.mtp_num_layers > 0)
    if teacher is not None:
        teacher = teacher.replace(mtp_num_layers=student.mtp_num_layers if mtp_teacher else 0) if used else None
    dp = layout.dp(world)
    micro = max(c.batch.global_batch_size // (c.batch.micro_batch_size * dp), 1)
    return StageSetup(name, student, teacher, layout, world, Batch(c.batch.micro_batch_size, c.data.seq_length,
                                                                   micro), knobs_of(c, backend), gpu_bytes,
                      mtp_teacher)


def refusal(s: StageSetup, plan: StagePlan) -> str:
    """Why a stage does not fit, and the cheapest changes that would make it fit, each with its new total."""
    lines = [f"stage {s.name!r} needs {gib(plan.total_bytes)} GiB per GPU (pipeline stage {plan.pipeline_stage}) "
             f"but {gib(plan.usable_bytes)} GiB are usable ({100 - int(FRAGMENTATION_MARGIN * 100)}% of "
             f"{gib(s.gpu_bytes)} GiB); largest component: {plan.largest} "
             f"{gib(plan.per_gpu_bytes[plan.largest])} GiB"]
    found = alternatives(s)
    if found:
        lines.append("changes that make it fit (new total per GPU):")
        lines += [f"  {text}: {gib(total)} GiB" for text, total in found]
    else:
        lines.append("no single change among bf16 gradients, recomputation, more PP or EP makes it fit: use more "
                     "GPUs per model replica or a smaller micro-batch / sequence")
    return "\n".join(lines)
