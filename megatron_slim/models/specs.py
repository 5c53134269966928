"""Layer specs for HybridModel, from one place, for both kernel backends.

What a layer computes (GDN, gated attention, MoE with shared expert, MTP) is fixed here; which kernels compute it
comes from a megatron-core `BackendSpecProvider`:
- Transformer Engine (`TESpecProvider`) when TE is importable and a GPU is present (FP8 capable), with the input
  norms fused into the following linear layers;
- torch-native modules otherwise (`TorchSpecProvider`: megatron-core's local linears and attention, and our
  sequence-parallel aware RMSNorm). This is also what runs on a GPU without Transformer Engine, and on CPU.

megatron-core's own hybrid and Gated DeltaNet spec builders assume Transformer Engine, so we own these specs.
megatron-core's Gated DeltaNet module imports fla (and through it triton and transformers) at import time, seconds
of start-up: it is imported only when a model with GDN layers is built.
With separate (unfused) norms, `sharded_state_dict_keys_map` stores the norm weights under the fused names, so one
distributed checkpoint loads with either backend.
"""
from __future__ import annotations

from functools import partial

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlock,
    MultiTokenPredictionBlockSubmodules,
    MultiTokenPredictionLayer,
    MultiTokenPredictionLayerSubmodules,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    MoETransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
)

from megatron_slim.models.norm import RMSNorm


class NormedHybridStack(HybridStack):
    """megatron-core's HybridStack always builds its final norm with Transformer Engine; this one takes the norm
    class from the spec, so the torch-native backend works too (same parameter name, `final_norm`)."""

    def __init__(self, config, submodules: HybridStackSubmodules, *, final_norm: type,
                 post_layer_norm: bool = True, **kwargs) -> None:
        super().__init__(config, submodules, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = final_norm(config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)


class TorchSpecProvider(LocalSpecProvider):
    """megatron-core's local modules, with an RMSNorm that supports sequence parallelism and zero-centred gamma."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False):
        if not rms_norm:
            raise ValueError("all supported families use RMSNorm")
        return RMSNorm


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(transformer_impl: str | None = None) -> tuple[str, BackendSpecProvider]:
    """Pick the backend: TE when importable on a GPU, torch-native otherwise (or as forced by `transformer_impl`)."""
    import torch

    if transformer_impl is None:
        transformer_impl = "transformer_engine" if torch.cuda.is_available() and have_transformer_engine() else "local"
    if transformer_impl == "transformer_engine":
        if not have_transformer_engine():
            raise RuntimeError("transformer_impl=transformer_engine but Transformer Engine is not installed "
                               "(pip install -e .[te])")
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return transformer_impl, TESpecProvider()
    if transformer_impl == "local":
        return transformer_impl, TorchSpecProvider()
    raise ValueError(f"unknown transformer_impl {transformer_impl!r} (use 'transformer_engine' or 'local')")


def _qkv_or_fused(backend: BackendSpecProvider) -> tuple[type, type, bool]:
    """(input norm, first linear, whether the norm is fused into that linear) for a block whose norm TE can fuse
    into its first linear."""
    fused = backend.fuse_layernorm_and_linear()
    norm = IdentityOp if fused else backend.layer_norm(rms_norm=True)
    linear = backend.column_parallel_layer_norm_linear() if fused else backend.column_parallel_linear()
    return norm, linear, fused


def attention_layer_spec(backend: BackendSpecProvider, qk_layernorm: bool) -> ModuleSpec:
    """Full (softmax) attention; with `attention_output_gate` in the config it is Qwen3-Next's gated attention."""
    norm, linear_qkv, fused = _qkv_or_fused(backend)
    qk_norm = backend.layer_norm(rms_norm=True, for_qk=True) if qk_layernorm else IdentityOp
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=linear_qkv,
                    core_attention=backend.core_attention(),
                    linear_proj=backend.row_parallel_linear(),
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={} if fused else {
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_"},
        ),
    )


def gdn_layer_spec(backend: BackendSpecProvider) -> ModuleSpec:
    """Gated DeltaNet linear attention (Qwen3-Next's `linear_attention` layers), cached for generation."""
    from megatron.core.ssm.gated_delta_net import GatedDeltaNetSubmodules

    from megatron_slim.models.gdn import CachedGatedDeltaNet
    from megatron_slim.runtime import cpu_compat

    cpu_compat.patch_gdn()
    norm, in_proj, fused = _qkv_or_fused(backend)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=CachedGatedDeltaNet,
                submodules=GatedDeltaNetSubmodules(
                    in_proj=in_proj,
                    out_norm=backend.layer_norm(rms_norm=True),
                    out_proj=backend.row_parallel_linear(),
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={} if fused else {"input_layernorm.": "self_attention.in_proj.layer_norm_"},
        ),
    )


def moe_layer_spec(backend: BackendSpecProvider, num_experts: int, grouped_gemm: bool) -> ModuleSpec:
    """Routed experts (+ optional shared expert and its sigmoid gate, set in the config)."""
    return ModuleSpec(
        module=MoETransformerLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=backend.layer_norm(rms_norm=True),
            mlp=get_moe_module_spec_for_backend(backend=backend, num_experts=num_experts,
                                                moe_grouped_gemm=grouped_gemm),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def dense_mlp_layer_spec(backend: BackendSpecProvider) -> ModuleSpec:
    """A dense SwiGLU MLP layer (Qwen3-MoE's `mlp_only_layers`)."""
    fused = backend.fuse_layernorm_and_linear()
    fc1 = backend.column_parallel_layer_norm_linear() if fused else backend.column_parallel_linear()
    return ModuleSpec(
        module=MLPLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=IdentityOp if fused else backend.layer_norm(rms_norm=True),
            mlp=partial(MLP.as_mlp_submodule,
                        submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=backend.row_parallel_linear())),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={} if fused else {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
        ),
    )


def mtp_block_spec(backend: BackendSpecProvider) -> ModuleSpec:
    """MTP depth: norm(embedding) and norm(hidden) concatenated, projected, then the pattern's layers."""
    norm = backend.layer_norm(rms_norm=True)
    return ModuleSpec(
        module=MultiTokenPredictionBlock,
        submodules=MultiTokenPredictionBlockSubmodules(
            layer_specs=[
                ModuleSpec(
                    module=MultiTokenPredictionLayer,
                    submodules=MultiTokenPredictionLayerSubmodules(
                        enorm=norm, hnorm=norm, eh_proj=backend.column_parallel_linear(),
                        mtp_model_layer=None, layer_norm=norm,
                    ),
                )
            ]
        ),
    )


def hybrid_stack_spec(backend: BackendSpecProvider, *, qk_layernorm: bool, num_experts: int,
                      grouped_gemm: bool, with_mtp: bool, with_gdn: bool) -> ModuleSpec:
    """The HybridStack spec: one spec per layer symbol of the hybrid pattern ('G', '*', 'E', '-'); the GDN spec
    (and its fla import) only `with_gdn`, i.e. when the pattern has a 'G'."""
    return ModuleSpec(
        module=NormedHybridStack,
        params={"final_norm": backend.layer_norm(rms_norm=True)},
        submodules=HybridStackSubmodules(
            gdn_layer=gdn_layer_spec(backend) if with_gdn else IdentityOp,
            attention_layer=attention_layer_spec(backend, qk_layernorm),
            mlp_layer=dense_mlp_layer_spec(backend),
            moe_layer=moe_layer_spec(backend, num_experts, grouped_gemm),
            mtp_block_spec=mtp_block_spec(backend) if with_mtp else None,
        ),
    )
