"""Gated DeltaNet with a generation cache: megatron-core's `GatedDeltaNet` refuses any inference context (0.19:
"GDN does not support inference for now"), which left Qwen3-Next generating without a cache.

A Gated DeltaNet layer's whole past is two small tensors per row: the last `conv_kernel - 1` inputs of its causal
depthwise convolution and the recurrent state S [heads, d_k, d_v] of the gated delta rule. `GenerationContext`
(megatron-core's static KV-cache context, plus those states) carries both between forwards; `CachedGatedDeltaNet`
reads and updates them for its rows (`batch_size_offset`, as attention does with its KV cache). Without a context
it is megatron-core's module unchanged (training, scoring, verification).

Per token, with q and k L2-normalised and q scaled by d_k^-1/2 (as megatron-core's chunked kernels do):

    S <- exp(g) * S;   S <- S + k (beta * (v - S^T k))^T;   o = S^T q

A prefill runs megatron-core's chunked kernel from the stored state and keeps its final state; one-token steps
run the recurrence above in float32.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.ssm.gated_delta_net import GatedDeltaNet


class GenerationContext(StaticInferenceContext):
    """megatron-core's static KV-cache context plus each Gated DeltaNet layer's (conv inputs, recurrent state)."""

    def __init__(self, max_batch_size: int, max_sequence_length: int) -> None:
        super().__init__(max_batch_size, max_sequence_length)
        self.recurrent_states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


class CachedGatedDeltaNet(GatedDeltaNet):
    """megatron-core's Gated DeltaNet that also runs under a `GenerationContext` (one pipeline stage, no sequence
    or context parallelism, no packed sequences: what static-batch generation uses)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                inference_context: Any = None, packed_seq_params: Any = None, sequence_len_offset: int | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if inference_context is None:
            return super().forward(hidden_states, attention_mask, None, packed_seq_params, sequence_len_offset,
                                   **kwargs)
        if not isinstance(inference_context, GenerationContext):
            raise TypeError("Gated DeltaNet layers generate under megatron_slim.models.gdn.GenerationContext, got "
                            f"{type(inference_context).__name__}")
        if self.sp_size > 1 or self.cp_size > 1 or packed_seq_params is not None:
            raise ValueError("cached Gated DeltaNet generation needs no sequence or context parallelism and no "
                             "packed sequences")
        return self._cached_forward(hidden_states, inference_context)

    def _states(self, context: GenerationContext, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's (conv inputs [B, K-1, D], recurrent state [B, H, d_k, d_v] float32), zeros at first."""
        if self.layer_number not in context.recurrent_states:
            kernel = self.conv1d.weight.shape[-1]
            conv = reference.new_zeros(context.max_batch_size, kernel - 1, self.conv_dim_local_tp)
            heads = self.num_v_heads_local_tp
            state = torch.zeros(context.max_batch_size, heads, self.key_head_dim, self.value_head_dim,
                                dtype=torch.float32, device=reference.device)
            context.recurrent_states[self.layer_number] = (conv, state)
        return context.recurrent_states[self.layer_number]

    def _cached_forward(self, hidden_states: torch.Tensor, context: GenerationContext
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        seq_len, batch, _ = hidden_states.shape
        rows = slice(context.batch_size_offset, context.batch_size_offset + batch)
        qkvzba, _ = self.in_proj(hidden_states)
        qkv, gate, beta, alpha = torch.split(qkvzba.transpose(0, 1), self.feat_dim_split, dim=-1)
        gate = gate.reshape(batch, seq_len, -1, self.value_head_dim)

        conv_cache, state_cache = self._states(context, qkv)
        inputs = torch.cat([conv_cache[rows].to(qkv.dtype), qkv], dim=1)  # [b, K-1+s, D]: the past, then now
        conv_cache[rows] = inputs[:, -conv_cache.shape[1]:]
        conv = F.conv1d(inputs.transpose(1, 2), self.conv1d.weight, self.conv1d.bias if self.conv_bias else None,
                        groups=self.conv_dim_local_tp)  # no padding: exactly the s new positions
        qkv = self.act_fn(conv).transpose(1, 2)

        query, key, value, gate, beta, alpha = self._prepare_input_for_gated_delta_rule(
            qkv, gate, batch, seq_len, beta, alpha)
        g, beta = self._compute_g_and_beta(self.A_log, self.dt_bias, alpha, beta)
        if seq_len == 1:
            out, state = _recurrent_step(query, key, value, g, beta, state_cache[rows])
        else:
            out, state = self.gated_delta_rule(query, key, value, g=g, beta=beta, initial_state=state_cache[rows],
                                               output_final_state=True, use_qk_l2norm_in_kernel=False,
                                               cu_seqlens=None)
        state_cache[rows] = state.float()
        norm_out = self._gated_norm_and_a2a(out.to(hidden_states.dtype), gate, None, batch, seq_len)
        return self.out_proj(norm_out)


def _recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                    state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the gated delta rule. q, k [b, 1, H, d_k]; v [b, 1, H, d_v]; g, beta [b, 1, H];
    state [b, H, d_k, d_v] -> (output [b, 1, H, d_v], new state), in float32."""
    q, k, v = (x[:, 0].float() for x in (q, k, v))
    q = q * q.shape[-1] ** -0.5
    state = state * g[:, 0].float().exp()[..., None, None]
    delta = (v - torch.einsum("bhk,bhkv->bhv", k, state)) * beta[:, 0].float()[..., None]
    state = state + torch.einsum("bhk,bhv->bhkv", k, delta)
    return torch.einsum("bhk,bhkv->bhv", q, state)[:, None], state
