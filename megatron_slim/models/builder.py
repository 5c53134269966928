"""Build a Megatron-Core model from a ModelConfig at the current parallel layout.

We build megatron-core's `HybridModel` (GPTModel is deprecated in megatron-core 0.19). Its layer pattern is the
natural description of these families: each HF decoder layer is a mixer ('G' Gated DeltaNet or '*' attention)
followed by an MLP ('E' MoE or '-' dense), and MTP depths follow '/'. Depth pruning and Qwen3-Next's
linear/full-attention interleave are then edits of one string, and HF layer i is hybrid layers 2i and 2i+1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.models.backends import BackendSpecProvider

from megatron_slim.models.config import ModelConfig, validate_layout
from megatron_slim.models.specs import hybrid_stack_spec, select_backend
from megatron_slim.runtime.layout import ParallelLayout


@dataclass(frozen=True)
class BuildOptions:
    """How to build (not what): precision, kernels, initialisation and loss knobs."""

    params_dtype: torch.dtype = torch.float32
    transformer_impl: str | None = None  # None: TE on GPU when installed, else torch-native
    moe_aux_loss_coeff: float | None = None  # None: the HF config's router_aux_loss_coef
    moe_z_loss_coeff: float | None = None
    mtp_loss_scaling_factor: float = 0.1
    perform_initialization: bool = True
    # activation recomputation, as TransformerConfig's recompute_* fields (train/config.py MemorySection)
    recompute_granularity: str | None = None  # selective | full
    recompute_method: str | None = None  # full: uniform | block
    recompute_num_layers: int | None = None
    recompute_modules: tuple[str, ...] | None = None  # selective
    moe_token_dispatcher: str = "auto"  # alltoall | allgather | flex; auto: alltoall on GPU, allgather on CPU
    fp8: str | None = None  # "e4m3" | "hybrid" (Transformer Engine only)
    fp8_recipe: str = "delayed"
    fp8_param: bool = False  # keep linear weights in FP8 (a frozen teacher's memory knob; TE only)
    use_cpu_initialization: bool | None = None  # None: on CPU-only machines (True also builds on the meta device)


def pipeline_pattern(cfg: ModelConfig, pp: int) -> str:
    """The hybrid pattern with '|' stage boundaries: equal numbers of HF layers per stage, never splitting a layer."""
    main, _, mtp = cfg.hybrid_pattern.partition("/")
    per = len(main) // pp
    stages = [main[i * per:(i + 1) * per] for i in range(pp)]
    return "|".join(stages) + ("/" + mtp if mtp else "")


def transformer_config(cfg: ModelConfig, parallel: ParallelLayout, opts: BuildOptions = BuildOptions()):
    from megatron.core.transformer.transformer_config import TransformerConfig

    validate_layout(cfg, parallel)
    impl, _ = select_backend(opts.transformer_impl)
    on_gpu = torch.cuda.is_available()
    if (opts.fp8 or opts.fp8_param) and impl != "transformer_engine":
        raise RuntimeError("FP8 needs Transformer Engine on a GPU (pip install -e .[te]); "
                           f"this run uses the {impl!r} backend")
    if opts.fp8_param and not opts.fp8:
        raise ValueError("fp8_param (FP8 weights) needs an fp8 format (e4m3 or hybrid)")
    dispatcher = opts.moe_token_dispatcher
    if dispatcher == "auto":
        dispatcher = "alltoall" if on_gpu else "allgather"
    if dispatcher not in ("alltoall", "allgather", "flex"):
        raise ValueError(f"moe_token_dispatcher must be alltoall, allgather or flex, not {dispatcher!r}")
    if dispatcher == "flex" and not on_gpu:
        raise RuntimeError("moe_token_dispatcher flex (DeepEP) needs GPUs; use alltoall or allgather")
    aux = cfg.router_aux_loss_coef if opts.moe_aux_loss_coeff is None else opts.moe_aux_loss_coeff
    kw = {}
    if cfg.has_gdn:
        kw.update(linear_num_key_heads=cfg.linear_num_key_heads, linear_num_value_heads=cfg.linear_num_value_heads,
                  linear_key_head_dim=cfg.linear_key_head_dim, linear_value_head_dim=cfg.linear_value_head_dim,
                  linear_conv_kernel_dim=cfg.linear_conv_kernel_dim)
    if cfg.shared_expert_ffn_hidden_size:
        kw.update(moe_shared_expert_intermediate_size=cfg.shared_expert_ffn_hidden_size,
                  moe_shared_expert_gate=cfg.shared_expert_gate)
    if opts.fp8:
        kw.update(fp8=opts.fp8, fp8_recipe=opts.fp8_recipe, fp8_param=opts.fp8_param)
    if opts.recompute_granularity == "full":
        kw.update(recompute_granularity="full", recompute_method=opts.recompute_method or "uniform",
                  recompute_num_layers=opts.recompute_num_layers or 1)
    elif opts.recompute_granularity == "selective":
        kw.update(recompute_granularity="selective",
                  recompute_modules=list(opts.recompute_modules) if opts.recompute_modules is not None
                  else ["core_attn"])
    elif opts.recompute_granularity is not None:
        raise ValueError(f"recompute_granularity must be selective or full, not {opts.recompute_granularity!r}")
    return TransformerConfig(
        num_layers=len(cfg.hybrid_pattern.split("/")[0]),
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.dense_ffn_hidden_size or cfg.moe_ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        layernorm_zero_centered_gamma=cfg.zero_centered_norm,
        qk_layernorm=cfg.qk_layernorm,
        attention_output_gate=cfg.attention_output_gate,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.initializer_range,
        num_moe_experts=cfg.num_experts,
        moe_router_topk=cfg.topk,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_router_pre_softmax=not cfg.norm_topk_prob,
        moe_router_score_function="softmax",
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss" if aux else "none",
        moe_aux_loss_coeff=aux,
        moe_z_loss_coeff=opts.moe_z_loss_coeff,
        moe_token_dispatcher_type=dispatcher,
        moe_grouped_gemm=impl == "transformer_engine",
        mtp_num_layers=cfg.mtp_num_layers or None,
        mtp_loss_scaling_factor=opts.mtp_loss_scaling_factor,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.expert_tp,
        context_parallel_size=parallel.cp,
        sequence_parallel=parallel.use_sequence_parallel,
        params_dtype=opts.params_dtype,
        bf16=opts.params_dtype == torch.bfloat16,
        pipeline_dtype=opts.params_dtype,
        transformer_impl=impl,
        deterministic_mode=not on_gpu,  # selects the torch GDN recurrence/conv on CPU
        use_cpu_initialization=not on_gpu if opts.use_cpu_initialization is None else opts.use_cpu_initialization,
        perform_initialization=opts.perform_initialization,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **kw,
    )


def build_model(cfg: ModelConfig, parallel: ParallelLayout, opts: BuildOptions = BuildOptions(),
                pre_process: bool | None = None, post_process: bool | None = None,
                backend: BackendSpecProvider | None = None):
    """Build this rank's HybridModel shard (megatron parallel state must be initialised). `backend` overrides the
    kernels `opts.transformer_impl` selects (its provider's modules must fit that transformer_impl's config)."""
    from megatron.core import parallel_state
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    tcfg = transformer_config(cfg, parallel, opts)
    if backend is None:
        _, backend = select_backend(tcfg.transformer_impl)
    spec = hybrid_stack_spec(backend, qk_layernorm=cfg.qk_layernorm, num_experts=cfg.num_experts,
                             grouped_gemm=tcfg.moe_grouped_gemm, with_mtp=cfg.mtp_num_layers > 0,
                             with_gdn=cfg.has_gdn)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    model = HybridModel(
        config=tcfg,
        hybrid_stack_spec=spec,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        hybrid_layer_pattern=pipeline_pattern(cfg, parallel.pp),
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=cfg.rotary_percent,
        rotary_base=cfg.rope_theta,
    )
    if opts.params_dtype != torch.float32:
        model = model.to(opts.params_dtype)
    if post_process:
        batch_major_logits(model)
    return model


def batch_major_logits(model: torch.nn.Module) -> None:
    """Make the output layer compute the logits in [b, s, v] memory order (its input transposed to [b, s, h]
    first, 1/vocab of the logits' size) and return them as an [s, b, v] view, so the model's own final
    `transpose(0, 1).contiguous()` to [b, s, v] copies nothing. That copy was a strided pass over the largest
    activation of the step, twice with a teacher and once more in the backward: 0.13 s per 200 MB of logits on
    the demo's CPU, and a second logits-sized buffer at peak on any device. The values are the same products.

    Only for forwards without `labels` (the model then returns the logits; with labels megatron-core's loss takes
    the [s, b, v] output as a flat [s * b, v] view), and not with sequence parallelism (the layer gathers its
    input along the sequence, dim 0), deferred embedding weight-gradients (the layer keeps its input for a later
    GEMM against [s, b] gradients) or MTP heads (megatron-core's MTP loss runs the layer and flattens its output
    too)."""
    c = model.config
    if c.sequence_parallel or c.defer_embedding_wgrad_compute or c.mtp_num_layers:
        return
    layer = model.output_layer
    returns_logits = [False]  # whether the model's forward in progress returns the logits (no labels)

    def note_labels(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        returns_logits[0] = kwargs.get("labels", args[4] if len(args) > 4 else None) is None

    def to_batch_major(_module: torch.nn.Module, args: tuple) -> tuple | None:
        hidden = args[0]
        if not returns_logits[0] or hidden.dim() != 3:
            return None
        return (hidden.transpose(0, 1).contiguous(), *args[1:])

    def to_sequence_major_view(_module: torch.nn.Module, args: tuple, output: tuple) -> tuple | None:
        if not returns_logits[0] or args[0].dim() != 3:
            return None
        logits, bias = output
        return logits.transpose(0, 1), bias

    model.register_forward_pre_hook(note_labels, with_kwargs=True)
    layer.register_forward_pre_hook(to_batch_major)
    layer.register_forward_hook(to_sequence_major_view)
