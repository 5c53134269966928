"""PNG views of an importance file and the cuts a plan makes, to sanity-check a target before pruning.

experts.png: per MoE layer, expert scores sorted (intact | base | merged-or-dropped boundaries marked);
layers.png: per decoder layer its depth score, dropped layers greyed; hidden.png: hidden-channel importance as a
histogram and a sorted curve with the cut marked. A plot whose statistics the file lacks is skipped.
Uses matplotlib's object API (no pyplot state), so it works headless and in threads.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from megatron_slim.compress.importance_file import Importance, layer_prefix
from megatron_slim.compress.plan import CompressionPlan
from megatron_slim.compress.planner import intact_count
from megatron_slim.compress.target import TargetSpec
from megatron_slim.models.config import ATTENTION, GDN, MOE


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def plot_experts(imp: Importance, spec: TargetSpec, plan: CompressionPlan, path: Path) -> bool:
    src = imp.model
    prefixes = [layer_prefix(i) for i, t in enumerate(src.mlp_types) if t == MOE]
    prefixes += [layer_prefix(mtp_depth=d) for d in range(src.mtp_num_layers)]
    names = [f"{p}experts.{spec.expert_criterion}" for p in prefixes]
    if not prefixes or any(n not in imp.tensors for n in names):
        return False
    logs = torch.stack([imp.tensors[n].double().sort(descending=True).values for n in names]).clamp(min=1e-30).log10()
    vmin = float(torch.quantile(logs.flatten(), 0.01))  # a few never-routed experts must not flatten the colours
    fig = _figure(10, 2 + 0.18 * len(prefixes))
    ax = fig.add_subplot()
    image = ax.imshow(logs.clamp(min=vmin).numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(image, ax=ax, label=f"log10 {spec.expert_criterion}")
    e2 = plan.target.num_experts
    n_intact = intact_count(spec.preserve_ratio, e2) if e2 < src.num_experts else e2
    cuts = [(n_intact, "intact | bases")] if 0 < n_intact < e2 else []
    cuts.append((e2, "kept | dropped" if n_intact == e2 else "slots | merged into bases"))
    for x, label in cuts:
        if x < src.num_experts:
            ax.axvline(x - 0.5, color="white", linestyle="--", linewidth=1.2)
            ax.text(x, -0.7, label, color="black", fontsize=8, ha="center", va="bottom")
    kept = {layer_prefix(i) for i in plan.layers} | {layer_prefix(mtp_depth=d)
                                                    for d in range(plan.target.mtp_num_layers)}
    ax.set_yticks(range(len(prefixes)), [p.rstrip(".") + ("" if p in kept else "  (dropped)") for p in prefixes],
                  fontsize=7)
    for label, p in zip(ax.get_yticklabels(), prefixes):
        label.set_color("black" if p in kept else "tab:red")
    ax.set_xlabel(f"expert rank within the layer (sorted by {spec.expert_criterion}, best left)")
    ax.set_title(f"Expert importance: {src.num_experts} -> {e2} experts, preserve ratio {spec.preserve_ratio}",
                 pad=14)
    fig.savefig(path)
    return True


def plot_layers(imp: Importance, spec: TargetSpec, plan: CompressionPlan, path: Path) -> bool:
    src = imp.model
    names = [f"{layer_prefix(i)}{spec.depth_criterion}" for i in range(src.num_layers)]
    if any(n not in imp.tensors for n in names):
        return False
    scores = [float(imp.tensors[n].reshape(-1)[0]) for n in names]
    kept = set(plan.layers)
    fig = _figure(max(6.0, 0.22 * src.num_layers + 2), 3.6)
    ax = fig.add_subplot()
    for mixer, color, label in ((ATTENTION, "tab:orange", "full attention"), (GDN, "tab:blue", "Gated DeltaNet")):
        idx = [i for i in range(src.num_layers) if src.mixer_types[i] == mixer]
        if not idx:
            continue
        ax.bar([i for i in idx if i in kept], [scores[i] for i in idx if i in kept], color=color,
               label=f"{label}, kept")
        dropped = [i for i in idx if i not in kept]
        if dropped:
            ax.bar(dropped, [scores[i] for i in dropped], color="lightgrey", edgecolor=color, hatch="//",
                   label=f"{label}, dropped")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(spec.depth_criterion)
    ax.set_title(f"Layer importance: {src.num_layers} -> {plan.target.num_layers} layers")
    ax.legend(fontsize=8)
    fig.savefig(path)
    return True


def plot_hidden(imp: Importance, plan: CompressionPlan, path: Path) -> bool:
    if "hidden.channels" not in imp.tensors:
        return False
    values = imp.tensors["hidden.channels"].double()
    ranked = values.sort(descending=True).values
    h, h2 = values.numel(), plan.target.hidden_size
    threshold = float(ranked[h2 - 1])
    fig = _figure(10, 3.6)
    hist, curve = fig.subplots(1, 2)
    bins = min(100, max(10, h // 16))
    positive = values[values > 0]
    if positive.numel() and float(positive.max()) > 100 * float(positive.min()):  # outlier channels: log axis
        lo, hi = math.log10(float(positive.min())), math.log10(float(positive.max()))
        hist.hist(positive.numpy(), bins=torch.logspace(lo, hi, bins + 1, dtype=torch.float64).numpy(),
                  color="tab:blue")
        hist.set_xscale("log")
    else:
        hist.hist(values.numpy(), bins=bins, color="tab:blue")
    hist.axvline(threshold, color="tab:red", linestyle="--", label=f"cut: keep >= {threshold:.3g}")
    hist.set_xlabel("mean |x| per hidden channel")
    hist.set_ylabel("channels")
    hist.legend(fontsize=8)
    curve.plot(range(h), ranked.numpy(), color="tab:blue")
    curve.axvline(h2 - 0.5, color="tab:red", linestyle="--", label=f"keep top {h2} of {h}")
    curve.set_yscale("log")
    curve.set_xlabel("channel rank")
    curve.set_ylabel("importance")
    curve.legend(fontsize=8)
    fig.suptitle(f"Hidden-channel importance: {h} -> {h2}")
    fig.savefig(path)
    return True


def write_plots(imp: Importance, spec: TargetSpec, plan: CompressionPlan, out_dir: str | Path) -> list[Path]:
    """Write the PNGs the file has statistics for; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in (("experts.png", lambda p: plot_experts(imp, spec, plan, p)),
                       ("layers.png", lambda p: plot_layers(imp, spec, plan, p)),
                       ("hidden.png", lambda p: plot_hidden(imp, plan, p))):
        if draw(out / name):
            written.append(out / name)
    return written
