"""The comparison of a recipe's variants: `<workdir>/report/compare.md`, `compare.json` and `loss_vs_tokens.png`.

Every variant is evaluated on the same held-out windows, so a difference between two variants is judged on the
per-window differences (eval/stats.py `paired_difference`): a variant differs from the reference only when the
mean difference exceeds twice its standard error. Everything is read from the work dir, so the comparison can be
rebuilt at any time, with rows for the variants that have not finished yet.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megatron_slim.eval.stats import PairedDiff, paired_difference
from megatron_slim.run.recipe_schema import Recipe, Study
from megatron_slim.run.report import benchmark_table
from megatron_slim.run.state import RunView
from megatron_slim.run.step_groups import EVAL_TEACHER, Out, stage_steps
from megatron_slim.run.variants import variant_views
from megatron_slim.runtime.jsonl import read_jsonl
from megatron_slim.runtime.outputs import atomic_write


@dataclass
class Curve:
    """Held-out loss along distillation: cumulative training tokens over the stages, loss and its SE."""

    tokens: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    loss_se: list[float] = field(default_factory=list)


@dataclass
class VariantResult:
    name: str
    finished: bool  # the last stage's evaluation is done
    eval: dict[str, Any] | None  # the final student's evaluation (eval.json)
    tokens_trained: float  # distillation tokens over every stage
    seconds: float  # wall time of its steps, shared ones included
    curve: Curve
    diff: PairedDiff | None = None  # loss minus the reference's, per held-out window

    def row(self) -> dict[str, Any]:
        ev = self.eval or {}
        return {"loss": ev.get("loss"), "loss_se": ev.get("loss_se"), "ppl": ev.get("ppl"),
                "accuracy": ev.get("accuracy"), "mtp_acceptance": ev.get("mtp_acceptance") or {},
                "tasks": ev.get("tasks") or {},
                "tokens_trained": self.tokens_trained, "seconds": self.seconds, "finished": self.finished,
                "diff_vs_reference": asdict(self.diff) if self.diff else None}


def _read_json(path: str | Path) -> dict[str, Any] | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def _variant(recipe: Recipe, view: RunView, name: str) -> VariantResult:
    last = stage_steps(recipe.stages[-1]).eval
    final = _read_json(view.outputs(last)[Out.EVAL]) if view.done(last) else None
    curve, offset = Curve(), 0.0
    for stage in recipe.stages:
        if not view.done(stage_steps(stage).distill):
            break
        metrics = Path(view.outputs(stage_steps(stage).distill)[Out.METRICS])
        for rec in read_jsonl(metrics.with_name("eval.jsonl")):
            curve.tokens.append(offset + rec["consumed_tokens"])
            curve.loss.append(rec["loss"])
            curve.loss_se.append(rec["loss_se"])
        records = read_jsonl(metrics)
        offset += records[-1]["consumed_tokens"] if records else 0.0
    seconds = sum(entry.get("seconds", 0.0) for entry in view.entries().values())
    return VariantResult(name, final is not None, final, offset, seconds, curve)


def variant_results(study: Study, workdir: Path) -> tuple[dict[str, Any] | None, dict[str, VariantResult]]:
    """(the teacher's evaluation, each variant's result in recipe order, differences against the reference)."""
    results, teacher = {}, None
    for run, view in variant_views(study, workdir):
        results[run.name] = _variant(run.recipe, view, run.name)
        if teacher is None and view.done(EVAL_TEACHER):
            teacher = _read_json(view.outputs(EVAL_TEACHER)[Out.EVAL])
    ref = results.get(study.reference)
    for res in results.values():
        if ref is not None and ref.finished and res.finished and res is not ref:
            res.diff = paired_difference(res.eval["window_losses"], ref.eval["window_losses"])
    return teacher, results


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def comparison_table(teacher: dict[str, Any] | None, results: dict[str, VariantResult], reference: str) -> str:
    """Markdown: one row per variant (and the teacher's), then the paired differences against the reference."""
    ks = sorted({int(k) for r in results.values() for k in ((r.eval or {}).get("mtp_acceptance") or {})})
    head = ["variant", "held-out loss ± SE", "perplexity", "next-token acc", "acc retention", "tokens trained",
            "wall time"] + [f"MTP accept@{k}" for k in ks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cells(label: str, ev: dict[str, Any] | None, tokens: str, seconds: str) -> list[str]:
        if ev is None:
            return [label, "(not finished)", "", "", "", tokens, seconds] + [""] * len(ks)
        acc = {int(k): v for k, v in (ev.get("mtp_acceptance") or {}).items()}
        retention = ev["accuracy"] / teacher["accuracy"] if teacher and teacher["accuracy"] else None
        return [label, f"{ev['loss']:.4f} ± {_fmt(ev.get('loss_se'), '.4f')}", f"{ev['ppl']:.2f}",
                f"{ev['accuracy']:.2%}", _fmt(retention, ".1%"), tokens, seconds] + [
                    f"{acc[k]:.2%}" if k in acc else "" for k in ks]

    if teacher:
        lines.append("| " + " | ".join(cells("teacher", teacher, "", "")) + " |")
    for name, r in results.items():
        label = f"{name} (reference)" if name == reference else name
        lines.append("| " + " | ".join(cells(label, r.eval, f"{r.tokens_trained:,.0f}", f"{r.seconds:.0f} s")) + " |")
    diffs = ["", f"Held-out loss minus `{reference}`'s, per evaluation window (paired: every variant is evaluated "
             "on the same windows); significant when |mean| > 2 SE.", "",
             "| variant | Δ loss | SE of Δ | windows | significant |", "|---|---|---|---|---|"]
    for name, r in results.items():
        if r.diff is not None:
            d = r.diff
            diffs.append(f"| {name} | {d.mean:+.4f} | {_fmt(d.se, '.4f')} | {d.n} | "
                         f"{('yes: ' + ('worse' if d.mean > 0 else 'better')) if d.significant else 'no'} |")
    return "\n".join(lines + diffs)


def plot_curves(results: dict[str, VariantResult], path: Path) -> bool:
    """Held-out loss against distillation tokens, one line per variant with a ± SE band."""
    from matplotlib.figure import Figure

    drawn = [(name, r.curve) for name, r in results.items() if r.curve.tokens]
    if not drawn:
        return False
    fig = Figure(figsize=(8, 4.5), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    for i, (name, c) in enumerate(drawn):
        # Ten colours, then the next line style: no two variants share a look however many there are.
        color, style = f"C{i % 10}", ("-", "--", ":", "-.")[i // 10 % 4]
        ax.plot(c.tokens, c.loss, marker="o", ms=3, color=color, ls=style, label=name)
        ax.fill_between(c.tokens, [m - s for m, s in zip(c.loss, c.loss_se)],
                        [m + s for m, s in zip(c.loss, c.loss_se)], color=color, alpha=0.2, lw=0)
    ax.set_xlabel("distillation tokens (all stages)")
    ax.set_ylabel("held-out loss (nats/token), ± SE")
    ax.legend(fontsize=8)
    fig.savefig(path)
    return True


def write_comparison(study: Study, workdir: Path) -> Path:
    """Write report/compare.md, compare.json and the curve plot; returns the markdown's path."""
    teacher, results = variant_results(study, workdir)
    out = workdir / "report"
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# Variants of {next(iter(study.recipes.values())).name}", "",
             f"Reference `{study.reference}`; work dir `{workdir}`; each variant's own report is "
             "`variants/<name>/report/report.md`.", "", comparison_table(teacher, results, study.reference), ""]
    benchmarks = benchmark_table([("teacher", teacher)] + [(name, r.eval) for name, r in results.items()], teacher)
    if benchmarks:
        parts += ["## Benchmarks (lm-evaluation-harness; retention vs the teacher in parentheses)", "", benchmarks, ""]
    if plot_curves(results, out / "loss_vs_tokens.png"):
        parts += ["## Held-out loss along distillation", "", "![loss vs tokens](loss_vs_tokens.png)", ""]
    atomic_write(out / "compare.json", json.dumps(
        {"reference": study.reference, "teacher": teacher,
         "variants": {name: r.row() | {"curve": asdict(r.curve)} for name, r in results.items()}}, indent=1))
    path = out / "compare.md"
    atomic_write(path, "\n".join(parts) + "\n")
    return path
