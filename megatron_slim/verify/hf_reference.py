"""transformers reference forwards on CPU, and a float64 forward of Qwen3-Next's MTP head.

Converted Megatron-Core models are checked against these. Two gaps in transformers are covered here:

* With `fla` installed, transformers routes Qwen3-Next's gated delta rule to fla's Triton kernels, which fail on
  CPU. `select_torch_kernels` points a model instance back at transformers' own PyTorch implementations.
* transformers drops Qwen3-Next's `mtp.*` tensors and has no MTP module, so `mtp_reference_logits` computes the
  MTP head straight from the on-disk tensors.
"""
from __future__ import annotations

import json
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN

from megatron_slim.runtime.fla_package import enter_fla_without_its_init

# transformers' decorator that binds a function to an external kernel (fla, causal_conv1d) when one is installed;
# the functions it returns keep the PyTorch implementation as `__wrapped__`.
_KERNEL_DISPATCH = "use_kernel_func_from_hub_with_fallback"


def load_hf_reference(hf_dir: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """transformers model from a local safetensors checkpoint, on CPU in eval mode, on plain PyTorch code paths.

    Eager attention and eager experts keep the reference free of fused/grouped kernels; Qwen3-Next's linear
    attention is moved off fla (see `select_torch_kernels`). `mtp.*` tensors are ignored by transformers."""
    enter_fla_without_its_init()  # transformers' Qwen3-Next imports fla's kernels from their submodules
    model = AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=dtype, local_files_only=True, trust_remote_code=False, use_safetensors=True,
        attn_implementation="eager", experts_implementation="eager")
    return select_torch_kernels(model.eval())


def select_torch_kernels(model: torch.nn.Module) -> torch.nn.Module:
    """Make this model instance call transformers' PyTorch kernels instead of fla/causal_conv1d ones.

    Modules such as Qwen3NextGatedDeltaNet call module-level kernel wrappers by global name. Each module whose
    forward does so gets an instance-level copy of that forward (decorators included) whose globals map every
    wrapper to its `__wrapped__` PyTorch function. Nothing global changes; other instances keep their kernels."""
    for module in model.modules():
        forward = type(module).forward
        torch_forward = _with_torch_kernels(forward)
        if torch_forward is not forward:
            module.forward = types.MethodType(torch_forward, module)
    return model


def _is_kernel_wrapper(obj: object) -> bool:
    code = getattr(obj, "__code__", None)
    return (code is not None and hasattr(obj, "__wrapped__")
            and code.co_qualname.split(".", 1)[0] == _KERNEL_DISPATCH)


def _global_names(code: types.CodeType) -> set[str]:
    """Global names `code` may look up, including inside its nested functions and comprehensions."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _cell_value(cell: types.CellType) -> object:
    try:
        return cell.cell_contents
    except ValueError:  # empty cell
        return None


def _with_torch_kernels(fn: object) -> object:
    """`fn` itself if it (or a function it decorates) calls no kernel wrapper, else a rebuilt copy that calls
    the wrapped PyTorch functions. Decorators are followed via `__wrapped__` and rebuilt around the copy."""
    if not isinstance(fn, types.FunctionType):
        return fn
    closure = fn.__closure__
    inner = getattr(fn, "__wrapped__", None)
    torch_inner = _with_torch_kernels(inner)
    if torch_inner is not inner and closure is not None:
        closure = tuple(types.CellType(torch_inner) if _cell_value(c) is inner else c for c in closure)
    glb = fn.__globals__
    swaps = {name: glb[name].__wrapped__ for name in _global_names(fn.__code__) if _is_kernel_wrapper(glb.get(name))}
    if not swaps and closure is fn.__closure__:
        return fn
    rebuilt = types.FunctionType(fn.__code__, {**glb, **swaps}, fn.__name__, fn.__defaults__, closure)
    rebuilt.__kwdefaults__ = fn.__kwdefaults__
    rebuilt.__dict__.update(fn.__dict__)
    rebuilt.__qualname__, rebuilt.__doc__, rebuilt.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    if inner is not None:
        rebuilt.__wrapped__ = torch_inner
    return rebuilt


@torch.no_grad()
def reference_logits(model: PreTrainedModel, tokens: torch.LongTensor) -> torch.Tensor:
    """Logits [B, S, V] of the full-sequence forward (no KV cache, so no cached-decode kernels)."""
    return model(input_ids=tokens, use_cache=False).logits


@torch.no_grad()
def reference_hidden(model: PreTrainedModel, tokens: torch.LongTensor) -> torch.Tensor:
    """Final hidden states [B, S, H] after the final norm: the input of the LM head and of the MTP head."""
    return model.model(input_ids=tokens, use_cache=False).last_hidden_state


class _Checkpoint:
    """Lazy by-name tensor reads from a safetensors checkpoint, single file or sharded with an index."""

    def __init__(self, hf_dir: Path) -> None:
        index = hf_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: hf_dir / shard for name, shard in weight_map.items()}
        else:
            path = hf_dir / "model.safetensors"
            with safe_open(path, "pt") as f:
                self.files = dict.fromkeys(f.keys(), path)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        with safe_open(self.files[name], "pt") as f:
            tensor = f.get_tensor(name)
        return tensor if dtype is None else tensor.to(dtype)

    def reader(self, prefix: str, dtype: torch.dtype) -> Callable[[str], torch.Tensor]:
        """Getter for the tensors of one module, by name relative to `prefix`."""
        return lambda name: self.get(prefix + name, dtype)

    def num_layers(self, prefix: str) -> int:
        """Number of `{prefix}{i}.*` blocks (layers are numbered 0..n-1)."""
        return len({name[len(prefix):].split(".", 1)[0] for name in self.files if name.startswith(prefix)})


def _zc_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3-Next's zero-centred RMSNorm: x_hat * (1 + w)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the first cos.shape[-1] channels of x [B, S, heads, D] (partial rotary)."""
    rot, keep = x[..., :cos.shape[-1]], x[..., cos.shape[-1]:]
    half1, half2 = rot.chunk(2, dim=-1)
    rot = rot * cos[:, :, None] + torch.cat([-half2, half1], dim=-1) * sin[:, :, None]
    return torch.cat([rot, keep], dim=-1)


def _gated_attention(x: torch.Tensor, w: Callable[[str], torch.Tensor], cfg: PretrainedConfig,
                     cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Qwen3-Next full attention: per-head [query | gate] q_proj, q/k norms, partial RoPE, causal GQA softmax,
    output gated by sigmoid(gate) before o_proj."""
    b, s, _ = x.shape
    hd, nh, nkv, eps = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps
    q, gate = F.linear(x, w("q_proj.weight")).view(b, s, nh, 2 * hd).chunk(2, dim=-1)
    k = F.linear(x, w("k_proj.weight")).view(b, s, nkv, hd)
    v = F.linear(x, w("v_proj.weight")).view(b, s, nkv, hd)
    q = _rotate(_zc_rmsnorm(q, w("q_norm.weight"), eps), cos, sin).transpose(1, 2)
    k = _rotate(_zc_rmsnorm(k, w("k_norm.weight"), eps), cos, sin).transpose(1, 2)
    k, v = k.repeat_interleave(nh // nkv, 1), v.transpose(1, 2).repeat_interleave(nh // nkv, 1)
    scores = (q @ k.transpose(-1, -2)) * hd ** -0.5
    future = torch.ones(s, s, dtype=torch.bool).triu(1)
    out = (scores.masked_fill(future, float("-inf")).softmax(-1) @ v).transpose(1, 2).reshape(b, s, nh * hd)
    return F.linear(out * torch.sigmoid(gate.reshape(b, s, nh * hd)), w("o_proj.weight"))


def _swiglu(x: torch.Tensor, w: Callable[[str], torch.Tensor], prefix: str, act: Callable) -> torch.Tensor:
    return F.linear(act(F.linear(x, w(f"{prefix}gate_proj.weight"))) * F.linear(x, w(f"{prefix}up_proj.weight")),
                    w(f"{prefix}down_proj.weight"))


def _sparse_moe(x: torch.Tensor, w: Callable[[str], torch.Tensor], cfg: PretrainedConfig) -> torch.Tensor:
    """Top-k softmax routing over per-expert SwiGLU MLPs plus a sigmoid-gated shared expert. Expert weights are
    read from disk only for the experts that some token selects."""
    act = ACT2FN[cfg.hidden_act]
    flat = x.reshape(-1, x.shape[-1])
    top_w, top_i = F.linear(flat, w("gate.weight")).softmax(-1).topk(cfg.num_experts_per_tok, dim=-1)
    if cfg.norm_topk_prob:
        top_w = top_w / top_w.sum(-1, keepdim=True)
    out = torch.sigmoid(F.linear(flat, w("shared_expert_gate.weight"))) * _swiglu(flat, w, "shared_expert.", act)
    for expert in top_i.unique().tolist():
        rows, slot = (top_i == expert).nonzero(as_tuple=True)
        out.index_add_(0, rows, top_w[rows, slot, None] * _swiglu(flat[rows], w, f"experts.{expert}.", act))
    return out.view_as(x)


@torch.no_grad()
def mtp_reference_logits(hf_dir: str | Path, tokens: torch.LongTensor, final_hidden: torch.Tensor, depth: int = 1,
                         dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Logits [B, S - depth, V] of Qwen3-Next's MTP head at `depth`, computed in `dtype` from the checkpoint's
    `mtp.*` tensors (plus `model.embed_tokens.weight` and `lm_head.weight`, or the embedding when tied).

    Semantics (megatron-core MTP, vLLM's Qwen3-Next MTP), h_0 = `final_hidden` [B, S, H] = the main model's
    hidden states after its final norm, for k = 1..depth and positions t in [0, S - k):
        e_k[t] = embed(tokens[t + k])
        x      = mtp.fc([zc_norm_emb(e_k[t]), zc_norm_hidden(h_{k-1}[t])])     (concat order: embedding first)
        x      = mtp.layers.{(k - 1) mod L}(x)   (pre-norm decoder layer: gated full attention, causal over
                                                  [0, S - k), RoPE positions 0..S-k-1 as in the main model; MoE)
        h_k[t] = zc_norm(mtp.norm)(x)
    logits = lm_head(h_depth). zc_norm is the zero-centred RMSNorm x_hat * (1 + w). Position t predicts token
    t + depth + 1. The last `depth` positions have no next token and are left out: megatron-core's rolled inputs
    hold filler there and its loss mask drops them, and causal attention keeps them from affecting positions
    [0, S - depth), so only logits[:, :S - depth] of a Megatron MTP forward are comparable. A
    checkpoint with L < depth MTP layers reuses them in turn, as vLLM does with Qwen3-Next's single layer."""
    hf_dir = Path(hf_dir)
    cfg = AutoConfig.from_pretrained(str(hf_dir), local_files_only=True, trust_remote_code=False)
    ckpt = _Checkpoint(hf_dir)
    n_layers = ckpt.num_layers("mtp.layers.")
    b, s = tokens.shape
    if n_layers == 0:
        raise ValueError(f"{hf_dir} has no mtp.layers.* tensors")
    if final_hidden.shape[:2] != (b, s) or not 1 <= depth < s:
        raise ValueError(f"need final_hidden [B, S, H] for tokens {tuple(tokens.shape)} and 1 <= depth < S, "
                         f"got {tuple(final_hidden.shape)} and depth {depth}")
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRotaryEmbedding  # imports fla: lazily

    eps = cfg.rms_norm_eps
    embed = ckpt.get("model.embed_tokens.weight")
    lm_head = ckpt.get("lm_head.weight" if "lm_head.weight" in ckpt else "model.embed_tokens.weight", dtype)
    fc = ckpt.get("mtp.fc.weight", dtype)
    norm_emb, norm_hidden, norm_out = (ckpt.get(f"mtp.{n}.weight", dtype)
                                       for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"))
    rotary = Qwen3NextRotaryEmbedding(cfg)
    hidden = final_hidden.to(dtype)
    for k in range(1, depth + 1):
        hidden = hidden[:, :-1]
        e = embed[tokens[:, k:]].to(dtype)
        x = F.linear(torch.cat([_zc_rmsnorm(e, norm_emb, eps), _zc_rmsnorm(hidden, norm_hidden, eps)], dim=-1), fc)
        layer = f"mtp.layers.{(k - 1) % n_layers}."
        cos, sin = rotary(x, torch.arange(s - k)[None])
        x = x + _gated_attention(_zc_rmsnorm(x, ckpt.get(f"{layer}input_layernorm.weight", dtype), eps),
                                 ckpt.reader(f"{layer}self_attn.", dtype), cfg, cos, sin)
        x = x + _sparse_moe(_zc_rmsnorm(x, ckpt.get(f"{layer}post_attention_layernorm.weight", dtype), eps),
                            ckpt.reader(f"{layer}mlp.", dtype), cfg)
        hidden = _zc_rmsnorm(x, norm_out, eps)
    return F.linear(hidden, lm_head)
