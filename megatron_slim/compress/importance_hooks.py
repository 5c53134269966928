"""Collect the importance statistics of `importance_file.py` from a Megatron-Core model at any TP/PP/EP/DP layout.

What each forward hook observes (megatron-core itself is not patched):
- router (TopKRouter): its input and its (probs, routing_map) output -> frequency and coactivation from the
  model's own routing decisions; soft_logits from a float32 recomputation of the router probabilities (the
  router's own precision); router_cosine from the router weight.
- routed experts (SequentialMLP, or TEGroupedMLP on GPU): the dispatched tokens, tokens_per_expert and the output,
  which megatron-core already scales by the gate, so REAP per token is the output norm. The neuron activations
  silu(gate) * up: with SequentialMLP, each local expert's linear_fc2 input divided by the routing probability
  megatron-core multiplied into it (per_token_scale; the rows whose probability is 0 are recomputed from fc1);
  with TEGroupedMLP recomputed per local expert from its fc1 weight (TE's fused path has no fc1 call to hook).
  Reading the fc2 input instead of recomputing fc1 keeps the pass near a plain forward's speed
  (bench/bench_importance.py).
- shared expert / dense MLP: the input of linear_fc2 (= silu(gate) * up); attention: the input of linear_proj
  (after the output gate); Gated DeltaNet: the input of out_proj (gated, normed).
- decoder layer i (hybrid layers 2i, 2i+1): input of 2i and output of 2i+1 -> block influence. Hidden channels
  recompute each residual-reading RMSNorm in float64 from its input, because Transformer Engine fuses the input
  norms into the following linear layer.

Reduction: every rank adds float64 SUMS into tensors of the model's global shapes (its heads, neurons and experts
at their global offsets, over its own tokens), so one all-reduce (sum) over the world gives the totals: TP and
expert-TP ranks own disjoint heads/neurons, sequence parallelism and DP give disjoint tokens, EP ranks own
disjoint experts and PP stages disjoint layers. What all ranks of a group would count alike is added by one of
them: router_cosine (TP rank 0 of DP rank 0), REAP (expert-TP rank 0, after summing the partial expert outputs
over expert-TP) and LM losses (TP rank 0; vocab-parallel cross entropy gives every TP rank the full loss).
Rank 0 divides by the counts.

The MTP layer runs on every position, so `mtp.{d}.` statistics include the last d+1 positions of each sequence,
whose rolled-in input token is megatron-core's filler (id 0): (d+1)/seq_len of the tokens. hidden.channels is the
mean over all tokens and the decoder's 2L+1 residual-reading norms (input and pre-MLP norms, final norm; not the
MTP head's).
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from megatron_slim.compress.importance_file import Importance, layer_prefix
from megatron_slim.errors import UserError
from megatron_slim.models.config import ATTENTION, DENSE_MLP, GDN, MOE, ModelConfig
from megatron_slim.models.unwrap import unwrap_model
from megatron_slim.runtime.distributed import local_device

_LM_LOSS = "_lm_loss"  # internal sums: [sum of per-token LM loss, predicted tokens]


@dataclass(frozen=True)
class CollectOptions:
    micro_batch: int = 1
    layer_loss: bool = False  # also run the model once per decoder layer with that layer skipped
    progress: bool = True


def sequence_count(tokens: int, seq_len: int, group: int, max_tokens: int | None = None) -> int:
    """Sequences to run: `tokens` rounded up to whole steps of `group` sequences (DP ranks x micro-batch, so that
    every rank runs the same micro-batches), or rounded down when rounding up would exceed `max_tokens`."""
    step_tokens = seq_len * group
    steps = math.ceil(tokens / step_tokens)
    if max_tokens is not None and steps * step_tokens > max_tokens:
        steps = max_tokens // step_tokens
        if steps == 0:
            raise UserError(f"--max-tokens {max_tokens} is below one step of {group} sequences of {seq_len} tokens")
    return steps * group


def _layer_shapes(cfg: ModelConfig, prefix: str, mixer: str, mlp: str) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {f"{prefix}block_influence": (1,)}
    if mixer == ATTENTION:
        shapes[f"{prefix}attention.heads"] = (cfg.num_attention_heads,)
    elif mixer == GDN:
        shapes[f"{prefix}gdn.heads"] = (cfg.linear_num_value_heads,)
    if mlp == MOE:
        e = cfg.num_experts
        shapes |= {f"{prefix}experts.{k}": (e,) for k in ("frequency", "soft_logits", "reap")}
        shapes |= {f"{prefix}experts.{k}": (e, e) for k in ("coactivation", "router_cosine")}
        shapes[f"{prefix}experts.neurons"] = (e, cfg.moe_ffn_hidden_size)
        if cfg.shared_expert_ffn_hidden_size:
            shapes[f"{prefix}shared_expert.neurons"] = (cfg.shared_expert_ffn_hidden_size,)
    elif mlp == DENSE_MLP:
        shapes[f"{prefix}dense_mlp.neurons"] = (cfg.dense_ffn_hidden_size,)
    return shapes


def stat_shapes(cfg: ModelConfig, layer_loss: bool) -> dict[str, tuple[int, ...]]:
    """Global shapes of every accumulated sum (the same on all ranks, so they reduce as one flat buffer)."""
    shapes: dict[str, tuple[int, ...]] = {"hidden.channels": (cfg.hidden_size,), _LM_LOSS: (2,)}
    for i, (mixer, mlp) in enumerate(zip(cfg.mixer_types, cfg.mlp_types)):
        shapes |= _layer_shapes(cfg, layer_prefix(i), mixer, mlp)
        if layer_loss:
            shapes[f"{layer_prefix(i)}loss_increase"] = (1,)
    mixer, mlp = cfg.mtp_layer_pattern
    for d in range(cfg.mtp_num_layers):
        shapes |= _layer_shapes(cfg, layer_prefix(mtp_depth=d), mixer, mlp)
    return shapes


def _hidden_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _rms_norm64_abs_sum(x64: torch.Tensor, norms: torch.Tensor, weight: torch.Tensor, eps: float,
                        zero_centered: bool) -> torch.Tensor:
    """sum over tokens of |RMSNorm(x)| per channel, in float64, from x [T, H] in float64 and its per-token norms:
    |x_t * r_t * w| = |w| * |x_t| * r_t with r_t = rsqrt(mean(x_t^2) + eps) > 0, so the sum is |w| * (r @ |x|), one
    matrix-vector product instead of three full-size temporaries (the hook runs on every residual-reading norm)."""
    r = torch.rsqrt(norms.square() / x64.shape[-1] + eps)
    w = weight.double()
    return (1.0 + w if zero_centered else w).abs() * (r @ x64.abs())


# Where the norm that reads the residual stream keeps its weight: a separate norm module (torch backend, MoE
# pre-MLP norm) or the layer_norm_weight of the linear layer TE fused it into.
_RESIDUAL_NORMS = (("input_layernorm", "weight"), ("pre_mlp_layernorm", "weight"),
                   ("self_attention.linear_qkv", "layer_norm_weight"), ("self_attention.in_proj", "layer_norm_weight"),
                   ("mlp.linear_fc1", "layer_norm_weight"))


def _residual_norm_weight(layer: torch.nn.Module) -> torch.Tensor:
    for path, attr in _RESIDUAL_NORMS:
        try:
            weight = getattr(layer.get_submodule(path), attr, None)
        except AttributeError:
            continue
        if isinstance(weight, torch.Tensor):
            return weight
    raise RuntimeError(f"no residual-stream norm found in {type(layer).__name__}")


def _local_fc1_weights(experts: torch.nn.Module) -> list[torch.Tensor]:
    """This rank's fc1 weight [2F/etp, H] ([gate; up] rows) of each local expert."""
    if hasattr(experts, "local_experts"):  # SequentialMLP
        return [e.linear_fc1.weight for e in experts.local_experts]
    return [getattr(experts.linear_fc1, f"weight{i}") for i in range(experts.num_local_experts)]  # TEGroupedMLP


class _Collector:
    """Forward hooks adding this rank's share of every statistic into global-shape float64 sums."""

    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, layer_loss: bool, device: torch.device) -> None:
        from megatron.core import parallel_state as ps

        self.cfg = cfg
        self.sums = {k: torch.zeros(shape, dtype=torch.float64, device=device)
                     for k, shape in stat_shapes(cfg, layer_loss).items()}
        self.active = True
        self.tp, self.tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        self.replica_leader = self.tp_rank == 0 and ps.get_data_parallel_rank() == 0
        self._handles: list = []
        self._block_inputs: dict[str, torch.Tensor] = {}
        # (tensor, its version, float64 copy [T, H], per-token norms) of the last residual-stream tensors read
        self._residuals: deque[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = deque(maxlen=2)
        inner = unwrap_model(model)
        for layer in inner.decoder.layers:
            index = layer.layer_number - 1  # global hybrid layer index (1-based layer_number)
            self._watch(layer, layer_prefix(index // 2), mixer=index % 2 == 0, main=True)
        final_norm = getattr(inner.decoder, "final_norm", None)
        if final_norm is not None:
            self._pre(final_norm, self._hidden_channels_hook(final_norm.weight))
        if getattr(inner, "mtp_process", False):
            for d, mtp_layer in enumerate(inner.mtp.layers):
                for j, layer in enumerate(mtp_layer.mtp_model_layer.layers):
                    self._watch(layer, layer_prefix(mtp_depth=d), mixer=j == 0, main=False)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._residuals.clear()

    def _residual64(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x as [T, H] float64, its per-token float64 norms). Each residual-stream tensor is read by two hooks (the
        norm of the layer it enters, and the block influence of the layer pair it enters or leaves), so both are
        made once: the last two are kept with the tensor itself (whose memory no other tensor can take while it is
        kept) and its version (an in-place change since makes them stale)."""
        for t, version, x64, norms in self._residuals:
            if t is x and version == x._version:
                return x64, norms
        flat = x.reshape(-1, x.shape[-1])
        x64 = flat.double()
        norms = torch.linalg.vector_norm(x64, dim=-1)  # the same values as dtype=float64 on `flat`, at half the cost
        self._residuals.append((x, x._version, x64, norms))
        return x64, norms

    def add(self, name: str, value: torch.Tensor | float, index: slice | int | tuple = slice(None)) -> None:
        self.sums[name][index] += value

    def _pre(self, module: torch.nn.Module, fn: Callable) -> None:
        def hook(mod, args, kwargs):
            if self.active:
                fn(_hidden_input(args, kwargs))
        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _post(self, module: torch.nn.Module, fn: Callable) -> None:
        def hook(mod, args, output):
            if self.active:
                fn(args, output)
        self._handles.append(module.register_forward_hook(hook))

    def _watch(self, layer: torch.nn.Module, prefix: str, mixer: bool, main: bool) -> None:
        """Hooks for one hybrid layer: the mixer (2i) or MLP (2i+1) half of decoder layer `prefix`."""
        if main:
            self._pre(layer, self._hidden_channels_hook(_residual_norm_weight(layer)))
        if mixer:
            self._pre(layer, lambda x: self._block_inputs.__setitem__(prefix, x))
            attn = layer.self_attention
            if hasattr(attn, "linear_proj"):
                self._pre(attn.linear_proj, self._heads_hook(f"{prefix}attention.heads", self.cfg.num_attention_heads,
                                                             self.cfg.head_dim))
            else:
                self._pre(attn.out_proj, self._heads_hook(f"{prefix}gdn.heads", self.cfg.linear_num_value_heads,
                                                          self.cfg.linear_value_head_dim))
            return
        self._post(layer, lambda args, out: self._block_influence(prefix, out[0] if isinstance(out, tuple) else out))
        mlp = layer.mlp
        if hasattr(mlp, "router"):
            self._watch_moe(mlp, prefix)
        else:
            self._pre(mlp.linear_fc2, self._neurons_hook(f"{prefix}dense_mlp.neurons", self.cfg.dense_ffn_hidden_size))

    def _watch_moe(self, moe: torch.nn.Module, prefix: str) -> None:
        router = moe.router
        if self.replica_leader:
            w = F.normalize(router.weight.detach().double(), dim=-1)
            self.add(f"{prefix}experts.router_cosine", w @ w.T)

        def on_router(args, out) -> None:
            # per-token probabilities in float32 (what the router itself computes), summed in float64
            x = args[0].reshape(-1, self.cfg.hidden_size).float()
            routed = out[1].float()  # routing_map [tokens, E]: 0/1, exact in float32
            probs = torch.softmax(x @ router.weight.float().T, dim=-1)
            self.add(f"{prefix}experts.soft_logits", probs.sum(0, dtype=torch.float64))
            self.add(f"{prefix}experts.frequency", routed.sum(0).double())
            self.add(f"{prefix}experts.coactivation", (routed.T @ routed).double())

        self._post(router, on_router)
        self._post(moe.experts, self._experts_hook(moe.experts, prefix))
        if moe.shared_experts is not None:
            self._pre(moe.shared_experts.linear_fc2,
                      self._neurons_hook(f"{prefix}shared_expert.neurons", self.cfg.shared_expert_ffn_hidden_size))

    def _experts_hook(self, experts: torch.nn.Module, prefix: str) -> Callable:
        n_local = experts.num_local_experts
        first = experts.ep_group.rank() * n_local
        etp_group = experts.tp_group
        etp, etp_rank = etp_group.size(), etp_group.rank()
        width = self.cfg.moe_ffn_hidden_size // etp
        neurons = slice(etp_rank * width, (etp_rank + 1) * width)
        weights = _local_fc1_weights(experts)
        name = f"{prefix}experts.neurons"

        def activations(i: int, x: torch.Tensor) -> torch.Tensor:
            gate, up = F.linear(x, weights[i]).chunk(2, dim=-1)
            return F.silu(gate) * up

        sequential = hasattr(experts, "local_experts")
        # SequentialMLP: each local expert's linear_fc2 input (activations x routing probability), read by a hook that
        # only keeps it; the layer's experts hook then handles them all at once (one float32 copy, one 1/p vector)
        fc2_inputs: list[torch.Tensor] = []
        if sequential:
            for expert in experts.local_experts:
                self._handles.append(expert.linear_fc2.register_forward_pre_hook(
                    lambda mod, args: fc2_inputs.append(args[0]) if self.active else None))
        apply_probs_on_input = experts.config.moe_apply_probs_on_input  # the experts then get probability 1

        def sequential_neurons(x: torch.Tensor, probs: torch.Tensor) -> None:
            """sum_t |a_t| / p_t per local expert (rows in expert order, as SequentialMLP splits them); p_t = 0 erased
            row t: recomputed from fc1."""
            inputs = [a.reshape(-1, a.shape[-1]) for a in fc2_inputs]
            fc2_inputs.clear()
            counts = [a.shape[0] for a in inputs]  # = tokens_per_expert, read without a device sync
            # float32 within the micro-batch (an expert's share of one micro-batch's tokens), float64 across them
            a = torch.cat(inputs).float().abs_()
            scale = (torch.ones_like(probs) if apply_probs_on_input else probs).reshape(-1).float()
            lost = scale == 0
            inverse = torch.where(lost, 0.0, 1.0 / scale)
            sums = torch.stack([w @ a for w, a in zip(inverse.split(counts), a.split(counts))])
            self.add(name, sums.double(), (slice(first, first + n_local), neurons))
            if lost.any():
                x = x.reshape(-1, x.shape[-1])
                for i, (rows, erased) in enumerate(zip(x.split(counts), lost.split(counts))):
                    if erased.any():
                        self.add(name, activations(i, rows[erased]).double().abs().sum(0), (first + i, neurons))

        def on_experts(args, out) -> None:
            x = args[0]
            y = out[0]  # gate-scaled expert outputs; partial sums over expert-TP ranks
            if etp > 1:
                y = y.clone()
                dist.all_reduce(y, group=etp_group)
            if etp_rank == 0:  # each token's output norm, summed per local expert in one index_add
                counts = args[1].to(device=y.device, dtype=torch.long)
                owner = torch.repeat_interleave(torch.arange(n_local, device=y.device), counts)
                # token norms in float32, summed in float64
                norms = torch.linalg.vector_norm(y, dim=-1, dtype=torch.float32).double()
                reap = torch.zeros(n_local, dtype=torch.float64, device=y.device).index_add_(0, owner, norms)
                self.add(f"{prefix}experts.reap", reap, slice(first, first + n_local))
            if sequential:
                sequential_neurons(x, args[2])
            else:
                start = 0
                for i, n in enumerate(args[1].tolist()):
                    if n:
                        self.add(name, activations(i, x[start:start + n]).double().abs().sum(0), (first + i, neurons))
                    start += n

        return on_experts

    def _heads_hook(self, name: str, heads: int, head_dim: int) -> Callable:
        local = heads // self.tp
        own = slice(self.tp_rank * local, (self.tp_rank + 1) * local)
        return lambda x: self.add(name, torch.linalg.vector_norm(x.reshape(-1, local, head_dim).double(), dim=-1
                                                                 ).sum(0), own)

    def _neurons_hook(self, name: str, width: int) -> Callable:
        local = width // self.tp
        own = slice(self.tp_rank * local, (self.tp_rank + 1) * local)
        return lambda x: self.add(name, x.reshape(-1, local).abs().sum(0, dtype=torch.float64), own)

    def _hidden_channels_hook(self, weight: torch.Tensor) -> Callable:
        cfg = self.cfg
        return lambda x: self.add("hidden.channels", _rms_norm64_abs_sum(*self._residual64(x), weight, cfg.norm_eps,
                                                                         cfg.zero_centered_norm))

    def _block_influence(self, prefix: str, out: torch.Tensor) -> None:
        (x, x_norms), (y, y_norms) = self._residual64(self._block_inputs.pop(prefix)), self._residual64(out)
        # cosine similarity in float64 as F.cosine_similarity defines it, without its normalised temporaries
        cos = torch.linalg.vecdot(x, y) / (x_norms * y_norms).clamp_min(1e-8)
        self.add(f"{prefix}block_influence", cos.sum())


def _identity_layer(hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
    return hidden_states, None


@contextmanager
def skipped_layer(model: torch.nn.Module, layer: int) -> Iterator[None]:
    """Run decoder layer `layer` (hybrid layers 2i and 2i+1) as the identity, on the stage that holds it."""
    targets = [m for m in unwrap_model(model).decoder.layers if (m.layer_number - 1) // 2 == layer]
    for m in targets:
        m.forward = _identity_layer
    try:
        yield
    finally:
        for m in targets:
            del m.forward


def _all_reduce(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = sorted(sums)
    flat = torch.cat([sums[k].flatten() for k in names])
    dist.all_reduce(flat)
    out, offset = {}, 0
    for k in names:
        n = sums[k].numel()
        out[k] = flat[offset:offset + n].view(sums[k].shape).cpu()
        offset += n
    return out


def finalize(cfg: ModelConfig, sums: dict[str, torch.Tensor], tokens: int) -> tuple[dict[str, torch.Tensor], float]:
    """Totals -> the importance file's tensors (schema in importance_file.py) and the mean LM loss."""
    loss_sum, loss_count = sums[_LM_LOSS].tolist()
    lm_loss = loss_sum / loss_count
    norms = 2 * cfg.num_layers + 1  # each decoder layer's input and pre-MLP norms, and the final norm
    out: dict[str, torch.Tensor] = {"hidden.channels": sums["hidden.channels"] / (tokens * norms)}
    for name, s in sums.items():
        if name in out or name == _LM_LOSS:
            continue
        kind, index, stat = name.split(".", 2)  # "layers.{i}.<stat>" or "mtp.{d}.<stat>"
        prefix = f"{kind}.{index}."
        if stat == "experts.reap":
            out[name] = s / sums[f"{prefix}experts.frequency"].clamp(min=1)
        elif stat == "experts.neurons":
            out[name] = s / sums[f"{prefix}experts.frequency"].clamp(min=1)[:, None]
        elif stat == "experts.router_cosine":
            out[name] = s
        elif stat == "block_influence":
            out[name] = 1.0 - s / tokens
        elif stat == "loss_increase":
            out[name] = s / loss_count - lm_loss
        else:  # frequency, soft_logits, coactivation, shared/dense neurons, heads: per-token means
            out[name] = s / tokens
        if stat == "attention.heads":
            out[f"{prefix}attention.query_groups"] = out[name].view(cfg.num_query_groups, -1).sum(1)
    return out, lm_loss


def collect(model: torch.nn.Module, cfg: ModelConfig, tokens: torch.Tensor, opts: CollectOptions = CollectOptions()
            ) -> Importance | None:
    """Statistics over `tokens` [n, S] (the same tensor on every rank; DP ranks take every dp-th row). Collective;
    returns the Importance on global rank 0 and None elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_slim.models.forward import forward_microbatches

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    n, seq_len = tokens.shape
    if n % (dp * opts.micro_batch):
        raise ValueError(f"{n} sequences do not split into {dp} DP ranks x micro-batch {opts.micro_batch}")
    device = local_device()
    mine = tokens[dp_rank::dp].to(device)
    per_call = opts.micro_batch * ps.get_pipeline_model_parallel_world_size()  # enough micro-batches to fill PP
    collector = _Collector(model, cfg, opts.layer_loss, device)
    count_loss = collector.tp_rank == 0

    def add_loss(name: str, batch: torch.Tensor, with_count: bool) -> Callable[[torch.Tensor, slice], None]:
        def on_logits(logits: torch.Tensor, rows: slice) -> None:
            targets = batch[rows].roll(-1, dims=1)  # next tokens; the last position has none and is dropped
            loss = vocab_parallel_cross_entropy(logits.float(), targets)[:, :-1].double().sum()
            if count_loss:
                collector.add(name, loss, 0)
                if with_count:
                    collector.add(name, float(targets[:, :-1].numel()), 1)
        return on_logits

    passes = 1 + (cfg.num_layers if opts.layer_loss else 0)
    bar = tqdm(total=tokens.numel() * passes, unit="tok", unit_scale=True, desc="importance",
               disable=not opts.progress or dist.get_rank() != 0)
    model.eval()
    try:
        for start in range(0, len(mine), per_call):
            batch = mine[start:start + per_call]
            collector.active = True
            forward_microbatches(model, batch, opts.micro_batch, add_loss(_LM_LOSS, batch, with_count=True))
            collector.active = False
            bar.update(dp * batch.numel())
            for layer in range(cfg.num_layers if opts.layer_loss else 0):
                with skipped_layer(model, layer):
                    forward_microbatches(model, batch, opts.micro_batch,
                                         add_loss(f"{layer_prefix(layer)}loss_increase", batch, with_count=False))
                bar.update(dp * batch.numel())
    finally:
        collector.remove()
        bar.close()
    totals = _all_reduce(collector.sums)
    if dist.get_rank() != 0:
        return None
    tensors, lm_loss = finalize(cfg, totals, tokens.numel())
    return Importance(cfg, tensors, tokens.numel(), options={"lm_loss": lm_loss, "sequences": n, "seq_len": seq_len,
                                                             "micro_batch": opts.micro_batch,
                                                             "layer_loss": opts.layer_loss})
