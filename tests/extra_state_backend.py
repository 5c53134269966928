"""A torch-native backend whose modules carry extra state the way Transformer Engine's do, for CPU tests of
backend-portable checkpoints (TE needs CUDA), and the worker that checks both directions of a load.

TE keeps FP8 scaling metadata in its linears, core attention and grouped expert GEMMs, returns it from
`get_extra_state` as a uint8 tensor (serialised; empty before any FP8 step) and leaves a module as built when
`set_extra_state` gets None or an empty tensor. These modules do the same with a real state that every forward
updates: an amax history of their inputs, newest first. As with TE, the core attention has extra state that
megatron-core leaves out of the sharded state dict (no checkpoint holds it), and the q/k norms have extra state
the local backend's norms lack (TE's standalone norms), so the two backends' checkpoints differ by extra state
alone.
"""
from __future__ import annotations

import io
from functools import partial

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_slim.checkpoint.mcore import load_model, load_model_config, save_model
from megatron_slim.errors import CheckpointError
from megatron_slim.models.builder import BuildOptions, build_model
from megatron_slim.models.forward import full_logits
from megatron_slim.models.norm import RMSNorm
from megatron_slim.models.specs import TorchSpecProvider
from megatron_slim.runtime.distributed import init_model_parallel
from megatron_slim.runtime.layout import ParallelLayout

HISTORY = 4


class AmaxHistory:
    """Mixin: records the amax of each forward's first input; saves and restores it as TE shapes extra state."""

    amax_history: torch.Tensor
    steps: int

    def _init_history(self) -> None:
        self.amax_history = torch.zeros(HISTORY)
        self.steps = 0

    def _record(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            self.amax_history = torch.roll(self.amax_history, 1)
            # an expert may get no tokens in a step: its amax is then 0, as TE records it
            self.amax_history[0] = x.detach().abs().max().float() if x.numel() else 0.0
        self.steps += 1

    def get_extra_state(self) -> torch.Tensor:
        if self.steps == 0:
            return torch.empty(0, dtype=torch.uint8)
        buf = io.BytesIO()
        torch.save({"amax_history": self.amax_history.clone(), "steps": self.steps}, buf)
        return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor | None) -> None:
        if state is None or state.numel() == 0:
            return
        saved = torch.load(io.BytesIO(state.numpy().tobytes()), weights_only=True)
        self.amax_history, self.steps = saved["amax_history"], saved["steps"]


class StateColumnLinear(AmaxHistory, ColumnParallelLinear):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_history()

    def forward(self, input_, *args, **kwargs):
        self._record(input_)
        return super().forward(input_, *args, **kwargs)


class StateRowLinear(AmaxHistory, RowParallelLinear):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_history()

    def forward(self, input_, *args, **kwargs):
        self._record(input_)
        return super().forward(input_, *args, **kwargs)


class StateCoreAttention(AmaxHistory, DotProductAttention):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_history()

    def forward(self, query, *args, **kwargs):
        self._record(query)
        return super().forward(query, *args, **kwargs)


class StateNorm(AmaxHistory, RMSNorm):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_history()

    def forward(self, x):
        self._record(x)
        return super().forward(x)


class ExtraStateBackend(TorchSpecProvider):
    """The local backend with the modules above wherever TE has extra state (experts included)."""

    def column_parallel_linear(self) -> type:
        return StateColumnLinear

    def row_parallel_linear(self) -> type:
        return StateRowLinear

    def core_attention(self) -> type:
        return StateCoreAttention

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False):
        return StateNorm if for_qk else super().layer_norm(rms_norm, for_qk, has_residual)

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool):
        return partial(SequentialMLP, submodules=MLPSubmodules(
            linear_fc1=StateColumnLinear, linear_fc2=StateRowLinear, activation_func=self.activation_func()))


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _histories(model: torch.nn.Module) -> dict[str, tuple[int, list[float]]]:
    return {name: (m.steps, m.amax_history.tolist()) for name, m in model.named_modules()
            if isinstance(m, AmaxHistory)}


def _object_keys(ckpt_dir: str) -> list[str]:
    """Sharded-object keys stored in a torch_dist checkpoint (unique keys without their shard suffix), but
    megatron-core's own `common_state`."""
    from megatron_slim.checkpoint.safe_metadata import SafeFileSystemReader

    md = SafeFileSystemReader(ckpt_dir).read_metadata().state_dict_metadata
    return sorted({k.split("/shard_")[0] for k, m in md.items() if not hasattr(m, "size")} - {"common_state"})


def portability(rank: int, world: int, converted: str, work: str, tokens: torch.Tensor) -> dict:
    """Both directions of a load between the local backend and the TE-style one, and the one refusal."""
    parallel = ParallelLayout()
    init_model_parallel(parallel, seed=11)
    cfg = load_model_config(converted)
    opts = BuildOptions(transformer_impl="local")
    out: dict = {}

    te_style = build_model(cfg, parallel, opts, backend=ExtraStateBackend())
    local = build_model(cfg, parallel, opts)
    load_model(te_style, converted)  # CPU-written: no extra state for TE's core attention, None for the rest
    load_model(local, converted)
    out["cpu_to_te_fresh"] = all(s == 0 for s in (m.steps for m in te_style.modules() if isinstance(m, AmaxHistory)))
    a, b = _tensors(te_style), _tensors(local)
    out["cpu_to_te_same_tensors"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    out["logits_te"], out["logits_local"] = full_logits(te_style, tokens), full_logits(local, tokens)
    out["histories"] = _histories(te_style)  # now real state, after one forward

    te_dir, local_dir = f"{work}/te_written", f"{work}/local_written"
    save_model(te_style, te_dir, cfg)
    save_model(local, local_dir, cfg)
    out["te_objects"], out["local_objects"] = _object_keys(te_dir), _object_keys(local_dir)

    back_local = build_model(cfg, parallel, opts)
    load_model(back_local, te_dir)  # TE-written into the local backend: extra state ignored, tensors strict
    a, b = _tensors(te_style), _tensors(back_local)
    out["te_to_local_same_tensors"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    out["logits_back_local"] = full_logits(back_local, tokens)

    back_te = build_model(cfg, parallel, opts, backend=ExtraStateBackend())
    load_model(back_te, te_dir)
    out["restored_histories"] = _histories(back_te)

    headless = build_model(cfg, parallel, opts, post_process=False)  # no final norm, no output layer
    save_model(headless, f"{work}/headless", cfg)
    try:
        load_model(build_model(cfg, parallel, opts, backend=ExtraStateBackend()), f"{work}/headless")
        out["headless_error"] = ""
    except CheckpointError as e:
        out["headless_error"] = str(e)
    return out
