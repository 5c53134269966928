"""Measure the activations a training forward keeps for its backward, per layer, with saved-tensor hooks.

Every tensor autograd saves during the forward passes through `torch.autograd.graph.saved_tensors_hooks`; we count
each underlying storage once (views and tensors saved by several ops share one) and leave out parameters (weights
saved by matmuls are not activations). Forward hooks on the model's hybrid layers and MTP depths attribute each
saved storage to the innermost layer running when it was saved; the rest (embedding, final norm, output layer,
losses) goes to "head". This is what `bench/bench_memory.py` prints and what `train/memory_plan.py`'s activation
formulas are checked against (tests/test_memory_plan.py).
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch

HEAD = "head"


class SavedActivations:
    """Bytes saved for backward while active, by scope: 'layer.<i>' (hybrid layer i of the decoder),
    'mtp.<k>' (MTP depth k, its own layers included) or HEAD."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.by_scope: dict[str, int] = defaultdict(int)
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._seen: set[int] = set()
        self._keep: list[torch.Tensor] = []  # saved storages stay alive while measured: data_ptr stays unique
        self._stack: list[str] = []
        self._handles = []
        decoder = getattr(model, "decoder", None)
        for i, layer in enumerate(getattr(decoder, "layers", [])):
            self._scope(layer, f"layer.{i}")
        mtp = getattr(model, "mtp", None)
        for k, layer in enumerate(getattr(mtp, "layers", [])):
            self._scope(layer, f"mtp.{k}")

    def _scope(self, module: torch.nn.Module, name: str) -> None:
        def enter(module: torch.nn.Module, args: tuple) -> None:
            self._stack.append(name)

        def leave(module: torch.nn.Module, args: tuple, output: object) -> None:
            self._stack.pop()

        self._handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key and key not in self._params and key not in self._seen:
            self._seen.add(key)
            self._keep.append(t)
            self.by_scope[self._stack[-1] if self._stack else HEAD] += storage.nbytes()
        return t

    @contextmanager
    def measure(self) -> Iterator["SavedActivations"]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._keep = [], []

    def per_layer_type(self, pattern: str) -> dict[str, list[int]]:
        """Bytes of each decoder layer grouped by its hybrid symbol ('G', '*', 'E', '-'), plus 'mtp' and HEAD."""
        main = pattern.split("/")[0].replace("|", "")
        out: dict[str, list[int]] = defaultdict(list)
        for scope, nbytes in self.by_scope.items():
            if scope.startswith("layer."):
                out[main[int(scope.split(".")[1])]].append(nbytes)
            elif scope.startswith("mtp."):
                out["mtp"].append(nbytes)
            else:
                out[HEAD].append(nbytes)
        return dict(out)
