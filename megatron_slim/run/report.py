"""The run's report: `<workdir>/report/report.md` with PNG plots beside it.

Sections: retention table (teacher vs each stage's pruned-before-training and distilled student on the same
held-out tokens), loss curves per stage, parameter and memory accounting per model, the importance pictures of
each stage's plan, and step timings. Everything is read from the work dir, so a report can be rebuilt at any time.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from megatron_slim.run.recipe_schema import Recipe
from megatron_slim.run.state import RunView
from megatron_slim.run.step_groups import (
    BENCH_INFERENCE,
    DATA,
    EVAL_TEACHER,
    REPORT,
    TEACHER,
    Out,
    random_student,
    stage_steps,
    student_step,
)
from megatron_slim.runtime.jsonl import read_jsonl
from megatron_slim.runtime.outputs import atomic_write

LOSS_KEYS = ("loss", "lm", "kd", "mtp_lm", "mtp_kd")


def _read_json(path: str | Path | None) -> dict[str, Any] | None:
    return json.loads(Path(path).read_text()) if path and Path(path).is_file() else None


def _evals(recipe: Recipe, state: RunView) -> list[tuple[str, dict[str, Any]]]:
    """(label, evaluation) rows in run order, for every evaluation that finished."""
    rows = []

    def add(label: str, step: str) -> None:
        if state.done(step):
            ev = _read_json(state.outputs(step).get(Out.EVAL))
            if ev is not None:
                rows.append((label, ev))

    add("teacher", EVAL_TEACHER)
    for s in recipe.stages:
        made = "initialised at random" if random_student(recipe, s) else "pruned"
        add(f"{s.name}: {made}, before training", stage_steps(s).eval_pruned)
        add(f"{s.name}: distilled", stage_steps(s).eval)
    return rows


def retention_table(recipe: Recipe, state: RunView) -> str:
    """Markdown table; retention = student next-token accuracy / teacher's (and the perplexity ratio)."""
    rows = _evals(recipe, state)
    if not rows:
        return "(no evaluations yet)"
    teacher = rows[0][1] if rows[0][0] == "teacher" else None
    ks = sorted({int(k) for _, ev in rows for k in (ev.get("mtp_acceptance") or {})})
    head = ["model", "held-out loss", "perplexity", "next-token acc", "acc retention", "ppl / teacher's"]
    head += [f"MTP accept@{k}" for k in ks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, ev in rows:
        cells = [label, f"{ev['loss']:.4f}", f"{ev['ppl']:.2f}", f"{ev['accuracy']:.2%}"]
        if teacher:
            cells += [f"{ev['accuracy'] / teacher['accuracy']:.1%}" if teacher["accuracy"] else "",
                      f"{ev['ppl'] / teacher['ppl']:.2f}x"]
        else:
            cells += ["", ""]
        acc = {int(k): v for k, v in (ev.get("mtp_acceptance") or {}).items()}
        cells += [f"{acc[k]:.2%}" if k in acc else "" for k in ks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _lower_is_better(metric: str) -> bool:
    """lm-eval's perplexity-style metrics (perplexity, word_perplexity, byte_perplexity, bits_per_byte)."""
    return "perplexity" in metric or metric == "bits_per_byte"


def benchmark_table(rows: list[tuple[str, dict[str, Any] | None]], teacher: dict[str, Any] | None) -> str:
    """Markdown: lm-eval task scores per model (rows of (label, evaluation)), each with its retention vs the
    teacher's score in parentheses (for perplexities, the multiple of the teacher's); empty when no evaluation
    scored tasks."""
    columns = sorted({(task, metric) for _, ev in rows for task, metrics in ((ev or {}).get("tasks") or {}).items()
                      for metric in metrics})
    if not columns:
        return ""
    ref = (teacher or {}).get("tasks") or {}
    lines = ["| model | " + " | ".join(f"{t} {m}" for t, m in columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for label, ev in rows:
        tasks = (ev or {}).get("tasks") or {}
        cells = []
        for task, metric in columns:
            value = tasks.get(task, {}).get(metric)
            base = ref.get(task, {}).get(metric)
            retention = ""
            if value is not None and base and label != "teacher":  # lower-is-better metrics: a multiple, not a share
                retention = f" ({value / base:.3g}x)" if _lower_is_better(metric) else f" ({value / base:.0%})"
            cells.append("" if value is None else f"{value:.4g}{retention}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def plot_losses(recipe: Recipe, state: RunView, path: Path) -> bool:
    """Loss parts against consumed tokens, stages side by side on one token axis."""
    fig = _figure(8, 4)
    ax = fig.add_subplot()
    offset, drawn_keys = 0, set()
    for s in recipe.stages:
        distill = stage_steps(s).distill
        metrics = state.outputs(distill).get(Out.METRICS) if state.done(distill) else None
        if not metrics or not Path(metrics).is_file():
            continue
        records = read_jsonl(Path(metrics))
        if not records:
            continue
        for i, key in enumerate(LOSS_KEYS):  # one colour per loss part across stages, labelled once
            pts = [(offset + r["consumed_tokens"], r[key]) for r in records if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), color=f"C{i}", label=None if drawn_keys & {key} else key)
                drawn_keys.add(key)
        ax.annotate(s.name, (offset, 1.0), xycoords=("data", "axes fraction"), xytext=(4, -12),
                    textcoords="offset points", fontsize=8)
        offset += records[-1]["consumed_tokens"]
        ax.axvline(offset, color="grey", lw=0.5, ls="--")
    if not drawn_keys:
        return False
    from matplotlib.ticker import ScalarFormatter

    ax.set_xlabel("distillation tokens (stages in order)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.legend(fontsize=7)
    fig.savefig(path)
    return True


def plot_retention(recipe: Recipe, state: RunView, path: Path) -> bool:
    rows = _evals(recipe, state)
    if len(rows) < 2:
        return False
    fig = _figure(8, 3.5)
    ax = fig.add_subplot(1, 2, 1)
    labels = [label.replace(", before training", "\nbefore training") for label, _ in rows]
    ax.bar(range(len(rows)), [math.log(ev["ppl"]) for _, ev in rows], color="tab:blue")
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("held-out loss (log perplexity)")
    ax = fig.add_subplot(1, 2, 2)
    ax.bar(range(len(rows)), [ev["accuracy"] for _, ev in rows], color="tab:green")
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("next-token accuracy")
    fig.savefig(path)
    return True


def _accounting(recipe: Recipe, state: RunView) -> str:
    from megatron_slim.checkpoint.mcore import load_model_config
    from megatron_slim.compress.accounting import account, human, human_bytes

    models = []
    if state.done(TEACHER):
        models.append(("teacher", state.outputs(TEACHER)[Out.MCORE]))
    models += [(f"{s.name} student", state.outputs(student_step(recipe, s))[Out.CHECKPOINT])
               for s in recipe.stages if state.done(student_step(recipe, s))]
    lines = ["| model | layers | hidden | experts (top-k) | total params | active params | bf16 weights |",
             "|---|---|---|---|---|---|---|"]
    for label, ckpt in models:
        cfg = load_model_config(ckpt)
        acc = account(cfg)
        lines.append(f"| {label} | {cfg.num_layers} | {cfg.hidden_size} | {cfg.num_experts} ({cfg.topk}) | "
                     f"{human(acc.total)} | {human(acc.active)} | {human_bytes(acc.checkpoint_bytes(2))} |")
    return "\n".join(lines)


def _efficiency(state: RunView) -> str:
    from megatron_slim.engines.bench_inference_job import Measurement, markdown_table

    bench = json.loads(Path(state.outputs(BENCH_INFERENCE)[Out.BENCH]).read_text())
    rows = [(m.pop("label"), Measurement(**m)) for m in bench["models"]]
    return bench["settings"] + "\n\n" + markdown_table(rows)


def data_stream_lines(recipe: Recipe, view: RunView | None) -> list[str]:
    """The run's data stream: each stage's planned range of samples, and per dataset of the blend the tokens
    available, requested and epochs (checked against data.max_epochs: UserError naming the dataset)."""
    from megatron_slim.run.recipe_check import stage_samples, stream_usage
    from megatron_slim.train.data import usage_lines

    ranges, start = [], 0
    for stage, n in zip(recipe.stages, stage_samples(recipe), strict=True):
        ranges.append(f"{stage.name} [{start}, {start + n})")
        start += n
    lines = [f"data stream: {start} samples of {recipe.data.seq_length} tokens; " + ", ".join(ranges)]
    blend = recipe.data.train
    if not isinstance(blend, list) and view is not None and view.done(DATA):
        blend = view.outputs(DATA)["train"]
    if isinstance(blend, list):
        lines += [f"  {line}" for line in usage_lines(stream_usage(recipe, blend))]
    else:
        lines.append(f"  {blend}: tokens available once prepare/data has tokenized it (checked then)")
    return lines


def _data(recipe: Recipe, state: RunView) -> str:
    """The data stream's use of each dataset, and the sample range each stage trained on (from the run's state)."""
    lines = data_stream_lines(recipe, state)
    trained = []
    for s in recipe.stages:
        if state.done(f"{s.name}/distill") and "data_samples" in state.outputs(f"{s.name}/distill"):
            start, end = state.outputs(f"{s.name}/distill")["data_samples"]
            trained.append(f"{s.name} [{start}, {end})")
    if trained:
        lines.append("trained on samples (half-open ranges): " + ", ".join(trained))
    return "\n".join(f"    {line}" for line in lines)


def write_report(recipe: Recipe, workdir: Path, state: RunView) -> Path:
    out = workdir / "report"
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# Run report: {recipe.name}", "",
             f"Teacher `{recipe.teacher}`; stages: {', '.join(s.name for s in recipe.stages)}; work dir `{workdir}`.",
             "", "## Retention (held-out data, same tokens for every model)", "", retention_table(recipe, state), ""]
    rows = _evals(recipe, state)
    benchmarks = benchmark_table(rows, rows[0][1] if rows and rows[0][0] == "teacher" else None)
    if benchmarks:
        parts += ["## Benchmarks (lm-evaluation-harness; retention vs the teacher in parentheses)", "", benchmarks, ""]
    if plot_retention(recipe, state, out / "retention.png"):
        parts += ["![retention](retention.png)", ""]
    parts += ["## Distillation loss", ""]
    parts += ["![losses](losses.png)", ""] if plot_losses(recipe, state, out / "losses.png") else ["(no metrics)", ""]
    parts += ["## Training data", "", _data(recipe, state), ""]
    parts += ["## Parameters and memory", "", _accounting(recipe, state), ""]
    if state.done(BENCH_INFERENCE):
        parts += ["## Deployment efficiency (HF checkpoints; transformers, and vLLM where the recipe asks)", "",
                  _efficiency(state), ""]
    parts += ["## Importance and plans", ""]
    for s in recipe.stages:
        if not state.done(stage_steps(s).plan):
            continue
        for plot in state.outputs(stage_steps(s).plan)[Out.PLOTS]:
            name = f"{s.name}-{Path(plot).name}"
            shutil.copyfile(plot, out / name)
            parts += [f"**{s.name}**: {Path(plot).stem}", "", f"![{name}]({name})", ""]
    parts += ["## Steps", "", "| step | status | time |", "|---|---|---|"]
    total = 0.0
    for step, entry in state.entries().items():
        if step == REPORT:  # this step, still running
            continue
        total += entry.get("seconds", 0.0)
        parts.append(f"| {step} | {entry.get('status')} | {entry.get('seconds', 0.0):.1f} s |")
    parts.append(f"| total | | {total:.1f} s |")
    path = out / "report.md"
    atomic_write(path, "\n".join(parts) + "\n")
    return path
