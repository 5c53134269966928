"""The SlimQwen paper's findings measured on the embedded teacher and data (`AblateJob`, `run_ablation`).

Each finding is a set of variants of one small recipe (one_shot compression of a sparsely routed SmolLM2 MoE,
distilled with the teacher online), all trained on the same tokens in the same order and evaluated on the same
held-out windows, so that each comparison is paired (eval/stats.py). Variants several findings share (the `base`
variant, and every step whose inputs agree) run once. The verdict is what the measurement says: a difference
counts only when it exceeds twice its standard error, otherwise the finding is inconclusive at this budget.

The suite's teacher routes sparsely (top-k below the expert count), unlike the demo's: with every expert active,
routing frequency is the same for all experts and the expert criteria could not differ.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from megatron_slim.errors import UserError
from megatron_slim.runtime import json_out
from megatron_slim.runtime.config_loader import load_yaml
from megatron_slim.runtime.outputs import atomic_write, prepare_workdir
from megatron_slim.runtime.seed import DEFAULT_SEED

SUITE_EXPERTS = 8
SUITE_TOPK = 6


@dataclass(frozen=True)
class Finding:
    """One claim of the paper and the variants that test it.

    kind: `better` (the first variant beats each other one), `same` (no variant differs from another) or
    `mtp` (the first variant's MTP acceptance@1 beats the second's)."""

    name: str
    paper: str
    kind: str
    variants: tuple[str, ...]


VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "random_init": {"init": "random"},
    "soft_logits": {"target": {"expert_criterion": "soft_logits"}},
    "reap": {"target": {"expert_criterion": "reap"}},
    "preserve_all": {"target": {"preserve_ratio": 1.0}},
    "merge_all": {"target": {"preserve_ratio": 0.0}},
    "kd_only": {"training": {"loss": {"kd_weight": 1.0}}},
    "lm_only": {"training": {"loss": {"kd_weight": 0.0}}},
    "mtp_lm": {"add_mtp_layers": 1, "training": {"loss": {"mtp_lm_weight": 0.2, "mtp_kd_weight": 0.0}}},
    "mtp_kd": {"add_mtp_layers": 1, "training": {"loss": {"mtp_lm_weight": 0.1, "mtp_kd_weight": 0.1}}},
    "depth_first": {"preset": "depth_first", "stage_token_split": [0.5, 0.5]},
}

FINDINGS = (
    Finding("init", "pruning the pre-trained teacher beats random initialisation by far", "better",
            ("base", "random_init")),
    Finding("criterion", "expert criteria (frequency, soft logits, REAP) differ little", "same",
            ("base", "soft_logits", "reap")),
    Finding("preserve", "partial preservation (0.5) beats plain pruning (1.0) and merging everything (0.0)",
            "better", ("base", "preserve_all", "merge_all")),
    Finding("loss", "KD + LM beats KD only and LM only", "better", ("base", "kd_only", "lm_only")),
    Finding("mtp", "MTP KD raises the MTP head's speculative acceptance over a plain MTP LM loss", "mtp",
            ("mtp_kd", "mtp_lm")),
    Finding("schedule", "progressive (depth first, two stages) beats one-shot at the same tokens", "better",
            ("depth_first", "base")),
)


@dataclass(frozen=True)
class AblateJob:
    """The `ablate` command's flags, by the same names."""

    workdir: Path
    suite: str = "paper"
    only: tuple[str, ...] = ()  # finding names; empty: all
    base: Path | None = None  # a recipe of the user's to run the findings on (default: the embedded one)
    json: bool = False
    progress: bool = True
    seeds: int = 1  # training seeds per variant: the noise shown then includes the data order and initialisation


def base_recipe() -> dict[str, Any]:
    """The suite's recipe (paths relative to the assets directory): one_shot to 20 layers and 6 experts of top-4,
    frequency criterion, partial preservation 0.5, KD + LM; the variants override it."""
    return {
        "name": "slimqwen-findings",
        "teacher": "teacher",
        "data": {"train": "train.jsonl", "calibration": "calibration.jsonl", "heldout": "heldout.jsonl",
                 "seq_length": 128},
        "parallel": {"tp": 1, "pp": 1, "ep": 1},
        "nproc": 1,
        "importance": {"tokens": 4096},
        "evaluation": {"tokens": 8192, "micro_batch": 8, "mtp_k": 2, "mtp_prompts": 8, "gen_tokens": 24,
                       "every_tokens": 8192},
        "target": {"num_layers": 20, "num_experts": 6, "topk": 4, "expert_criterion": "frequency",
                   "preserve_ratio": 0.5},
        "preset": "one_shot",
        "train_tokens": 16384,  # 16 steps of 8 x 128 tokens: the whole suite within an hour on 2 CPU cores
        "training": {"batch": {"micro_batch_size": 8, "global_batch_size": 8},
                     "optimizer": {"lr": 5.0e-4, "min_lr": 5.0e-5, "weight_decay": 0.0},
                     "schedule": {"style": "cosine", "warmup_iters": 2},
                     "loss": {"kd_weight": 0.5, "temperature": 1.0},
                     "checkpoint": {"save_interval": 8, "keep_last": 1}, "logging": {"log_interval": 4}},
        "export": False,
    }


def findings(only: tuple[str, ...]) -> list[Finding]:
    names = [f.name for f in FINDINGS]
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise UserError(f"--only: no finding {unknown} (findings: {', '.join(names)})")
    return [f for f in FINDINGS if not only or f.name in only]


def _absolute(raw: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """The recipe with its file paths (teacher, data sources) made absolute, to be written elsewhere."""
    def path(p: Any) -> str:
        return str((base_dir / str(p)).resolve())

    out = dict(raw, teacher=path(raw["teacher"])) if raw.get("teacher") else dict(raw)
    data = dict(out.get("data") or {})
    for key in ("calibration", "heldout"):
        if data.get(key):
            data[key] = path(data[key])
    train = data.get("train")
    if isinstance(train, str) and train:
        data["train"] = path(train)
    elif isinstance(train, list):
        data["train"] = [[w, path(p)] if isinstance(w, (int, float)) else [w, p] for w, p in train]
    return out | {"data": data}


def replicate(name: str, seed_index: int) -> str:
    """The variant name of `name`'s training seed number `seed_index` (0: the recipe's own seed, `name` itself)."""
    return name if seed_index == 0 else f"{name}_seed{seed_index + 1}"


def _with_seed(overrides: dict[str, Any], seed: int) -> dict[str, Any]:
    training = dict(overrides.get("training") or {})
    training["train"] = dict(training.get("train") or {}) | {"seed": seed}
    return dict(overrides) | {"training": training}


def prepare_suite(chosen: list[Finding], workdir: Path, base: Path | None = None, seeds: int = 1) -> Path:
    """The study recipe (`<workdir>/suite.yaml`): the chosen findings' variants over `base`, or over the embedded
    suite recipe, whose sparse teacher and data are built once into the cache; with `seeds` > 1 each variant also
    runs with the next training seeds (`NAME_seed2`, ...: data order and initialisation of what is trained from
    scratch; importance, plans and pruning are shared). Returns its path."""
    if seeds < 1:
        raise UserError(f"--seeds {seeds}: give at least one seed")
    if base is None:
        from megatron_slim.data.assets import cache_dir
        from megatron_slim.demo.demo_job import prepare_data, upcycled_teacher

        root = cache_dir() / "findings"
        upcycled_teacher(root / "teacher", SUITE_EXPERTS, SUITE_TOPK)
        prepare_data(root)
        recipe, base_dir = base_recipe(), root
    else:
        if not base.is_file():
            raise UserError(f"--base {base} does not exist")
        recipe, base_dir = load_yaml(base), base.parent
        if not isinstance(recipe, dict) or "variants" in recipe:
            raise UserError(f"--base {base}: give a recipe without variants (the suite adds its own)")
    recipe = _absolute(recipe, base_dir)
    first_seed = int(((recipe.get("training") or {}).get("train") or {}).get("seed", DEFAULT_SEED))
    recipe["variants"] = {replicate(name, k): VARIANTS[name] if k == 0 else _with_seed(VARIANTS[name], first_seed + k)
                          for f in chosen for name in f.variants for k in range(seeds)}
    recipe["reference"] = chosen[0].variants[0]
    prepare_workdir(workdir, owner="ablate", inputs=[base] if base is not None else [])
    return atomic_write(workdir / "suite.yaml", yaml.safe_dump(recipe, sort_keys=False))


@dataclass(frozen=True)
class Verdict:
    finding: Finding
    verdict: str  # agrees | disagrees | inconclusive | not finished
    evidence: str
    variants: dict[str, dict[str, Any]]


def _acceptance_gap(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> tuple[float, float]:
    """Acceptance@1 of a minus b's (means over their seeds), and the standard error of that difference: two
    independent proportions over all their drafting positions, plus the spread of the seeds' gaps."""
    def rate(runs: list[dict[str, Any]]) -> tuple[float, int]:
        return (sum(float(r["mtp_acceptance"]["1"]) for r in runs) / len(runs),
                sum(int(r["mtp_positions"]) for r in runs))

    (pa, na), (pb, nb) = rate(a), rate(b)
    gaps = [float(x["mtp_acceptance"]["1"]) - float(y["mtp_acceptance"]["1"]) for x, y in zip(a, b)]
    seed_var = statistics.variance(gaps) / len(gaps) if len(gaps) > 1 else 0.0
    return pa - pb, math.sqrt(pa * (1 - pa) / na + pb * (1 - pb) / nb + seed_var)


def judge(finding: Finding, evals: dict[str, list[dict[str, Any]]]) -> tuple[str, str]:
    """(verdict, evidence) from the variants' final evaluations (eval.json: window_losses, MTP acceptance), one per
    training seed, every variant with the same seeds."""
    from megatron_slim.eval.stats import replicated_difference

    if any(not evals.get(name) for name in finding.variants):
        return "not finished", ""
    if finding.kind == "mtp":
        gap, se = _acceptance_gap(evals[finding.variants[0]], evals[finding.variants[1]])
        significant = abs(gap) > 2 * se
        evidence = (f"acceptance@1 {finding.variants[0]} - {finding.variants[1]}: {gap:+.2%} ± {se:.2%}"
                    f"{' *' if significant else ''}")
        return ("agrees" if gap > 0 else "disagrees") if significant else "inconclusive", evidence
    pairs = ([(finding.variants[0], other) for other in finding.variants[1:]] if finding.kind == "better" else
             [(a, b) for i, a in enumerate(finding.variants) for b in finding.variants[i + 1:]])
    diffs = {(a, b): replicated_difference([r["window_losses"] for r in evals[a]],
                                           [r["window_losses"] for r in evals[b]]) for a, b in pairs}
    evidence = "; ".join(f"{a} - {b}: {d.mean:+.4f} ± {d.se:.4f}{' *' if d.significant else ''}"
                         for (a, b), d in diffs.items())
    if finding.kind == "same":
        return ("disagrees" if any(d.significant for d in diffs.values()) else "agrees"), evidence
    if any(d.significant and d.mean > 0 for d in diffs.values()):
        return "disagrees", evidence
    return ("agrees" if all(d.significant for d in diffs.values()) else "inconclusive"), evidence


def _row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A variant's figures: means over its seeds; the loss's SE over windows and seeds (eval/stats.py)."""
    from megatron_slim.eval.stats import replicated_mean

    loss, loss_se = replicated_mean([r["window_losses"] for r in runs])
    rates = [r.get("mtp_acceptance") or {} for r in runs]
    return {"loss": loss, "loss_se": loss_se, "ppl": math.exp(loss),
            "accuracy": statistics.fmean(r["accuracy"] for r in runs), "seeds": len(runs),
            "mtp_acceptance": {k: statistics.fmean(float(r[k]) for r in rates) for k in rates[0]
                               if all(k in r for r in rates)}}


def verdicts(recipe_path: Path, workdir: Path, chosen: list[Finding], seeds: int = 1) -> list[Verdict]:
    from megatron_slim.run.compare import variant_results
    from megatron_slim.run.recipe_parse import read_study

    _, results = variant_results(read_study(recipe_path), workdir)
    finished = {name: r.eval for name, r in results.items() if r.finished}
    evals = {name: [finished[replicate(name, k)] for k in range(seeds)]
             for f in chosen for name in f.variants if all(replicate(name, k) in finished for k in range(seeds))}
    out = []
    for f in chosen:
        verdict, evidence = judge(f, evals)
        out.append(Verdict(f, verdict, evidence, {n: _row(evals[n]) for n in f.variants if n in evals}))
    return out


def format_table(found: list[Verdict], seeds: int = 1) -> str:
    noise = "SE over windows" + (f" and {seeds} training seeds" if seeds > 1 else "")
    lines = [f"| finding | the paper | measured (held-out loss ± SE; MTP: acceptance@1; {noise}) "
             "| differences (paired Δ ± SE; * beyond 2 SE) | verdict |",
             "|---|---|---|---|---|"]
    for v in found:
        cells = []
        for name, row in v.variants.items():
            if v.finding.kind == "mtp":
                cells.append(f"{name} {float(row['mtp_acceptance'].get('1', math.nan)):.2%}")
            else:
                cells.append(f"{name} {row['loss']:.4f} ± {row['loss_se']:.4f}")
        lines.append(f"| {v.finding.name} | {v.finding.paper} | {'; '.join(cells)} | {v.evidence} | {v.verdict} |")
    return "\n".join(lines)


def as_json(found: list[Verdict]) -> dict[str, Any]:
    return {"findings": [{"name": v.finding.name, "paper": v.finding.paper, "verdict": v.verdict,
                          "evidence": v.evidence, "variants": v.variants} for v in found]}


def _study_view(recipe_path: Path, workdir: Path, variant: str):
    from megatron_slim.run.recipe_parse import read_study
    from megatron_slim.run.variants import variant_views

    run, view = next((r, v) for r, v in variant_views(read_study(recipe_path), workdir) if r.name == variant)
    return run.recipe, view


def teacher_check(recipe_path: Path, workdir: Path, reference: str, dense: Path | None) -> dict[str, Any]:
    """Whether the teacher makes the criteria findings meaningful: its held-out quality (and, for the embedded
    teacher, the dense model's: the same SmolLM2 as an all-experts-active MoE, exact to it), and how differently
    the expert criteria rank its experts (compress/criteria.py) in the importance pass the variants share."""
    from megatron_slim.compress.criteria import criteria_agreement
    from megatron_slim.compress.importance_file import Importance
    from megatron_slim.run.step_groups import DATA, EVAL_TEACHER, Out, stage_steps

    recipe, view = _study_view(recipe_path, workdir, reference)
    def quality(path: str | Path) -> dict[str, Any]:
        return {k: v for k, v in json.loads(Path(path).read_text()).items() if k != "window_losses"}

    out: dict[str, Any] = {"teacher": quality(view.outputs(EVAL_TEACHER)[Out.EVAL])}
    first = recipe.stages[0]
    if view.done(stage_steps(first).importance):
        imp = Importance.load(view.outputs(stage_steps(first).importance)[Out.IMPORTANCE])
        keep = first.target.num_experts or imp.model.num_experts
        out["criteria"] = [vars(a) for a in criteria_agreement(imp, keep)]
        out["criteria_keep"] = keep
    if dense is not None:
        from megatron_slim.engines.evaluate_job import EvaluateJob, run_evaluate

        e, path = recipe.evaluation, workdir / "report" / "dense_eval.json"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            run_evaluate(EvaluateJob(model=str(dense), data=view.outputs(DATA)[Out.HELDOUT],
                                     tokens=int(e.tokens), seq_len=recipe.data.seq_length, micro_batch=e.micro_batch,
                                     mtp_k=0, out=path))
        out["dense"] = quality(path)
    return out


def format_teacher_check(check: dict[str, Any]) -> str:
    t = check["teacher"]
    lines = [f"suite teacher: held-out loss {t['loss']:.4f} ± {t['loss_se']:.4f} (perplexity {t['ppl']:.1f})"]
    if "dense" in check:
        d = check["dense"]
        lines.append(f"the dense model (every expert active, exact to it): loss {d['loss']:.4f} ± {d['loss_se']:.4f} "
                     f"(perplexity {d['ppl']:.1f})")
    for a in check.get("criteria", []):
        rho = "constant in every layer" if a["constant_layers"] == a["layers"] else f"Spearman {a['spearman']:+.2f}"
        lines.append(f"{a['first']} vs {a['second']}: {rho}; they keep different experts (top "
                     f"{check['criteria_keep']}) in {a['layers_differing']} of {a['layers']} MoE layers")
    return "\n".join(lines)


def run_ablation(job: AblateJob) -> int:
    """Run the chosen findings' variants (shared steps once) and print the verdicts; the exit status."""
    from megatron_slim.run.recipe_job import RunJob, run_recipe

    if job.suite != "paper":
        raise UserError(f"--suite {job.suite!r}: the only suite is `paper`")
    chosen = findings(job.only)
    recipe_path = prepare_suite(chosen, job.workdir, job.base, job.seeds)
    code = run_recipe(RunJob(recipe=recipe_path, workdir=job.workdir, progress=job.progress))
    if code:
        if job.json:  # one JSON document whatever happened: the failure, with where to look
            json_out.emit({"error": f"the suite's run failed (exit status {code}); its log and state are in "
                                    f"{job.workdir}", "exit_status": code, "workdir": str(job.workdir)})
        return code
    found = verdicts(recipe_path, job.workdir, chosen, job.seeds)
    dense = None
    if job.base is None:
        from megatron_slim.data.assets import cache_dir
        from megatron_slim.demo.demo_job import DEMO_EXPERTS, upcycled_teacher

        dense = cache_dir() / "demo" / "teacher"
        upcycled_teacher(dense, DEMO_EXPERTS, DEMO_EXPERTS)
    check = teacher_check(recipe_path, job.workdir, chosen[0].variants[0], dense)
    result = as_json(found) | {"teacher_check": check}
    atomic_write(job.workdir / "report" / "findings.json", json_out.dumps(result, indent=1))
    text = format_teacher_check(check) + "\n\n" + format_table(found, job.seeds)
    atomic_write(job.workdir / "report" / "findings.md", text + "\n")
    if job.json:
        json_out.emit(result)
    else:
        print("\n" + text, flush=True)
    return 0
