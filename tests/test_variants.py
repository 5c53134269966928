"""Recipe variants (`run` with `variants:`): validation before compute, steps shared by digest and computed once,
`init: random`, evaluation along distillation, the comparison report with paired differences, and a killed variant
resuming to the same weights."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from megatron_slim.eval.stats import paired_difference
from megatron_slim.run.recipe_check import load_study
from megatron_slim.run.recipe_schema import RecipeError
from megatron_slim.run.state import RunState
from support.run_assets import build, recipe as chain_recipe, write_recipe
from support.train_assets import cli

STEPS = 4  # distillation steps of 8 x 32 tokens per variant


def _study(root: Path, **over) -> dict:
    """One-shot recipe over the chain assets with three variants: as written, KD only (shares everything up to
    distillation) and random init (shares the teacher, data, importance and plan steps)."""
    recipe = chain_recipe(root, name="tiny-variants", preset="one_shot", train_tokens=STEPS * 8 * 32,
                          evaluation={"tokens": 256, "mtp_k": 2, "mtp_prompts": 2, "gen_tokens": 6,
                                      "every_tokens": 2 * 8 * 32})
    recipe["training"]["checkpoint"] = {"save_interval": 1, "keep_last": 2}
    recipe["variants"] = {"pruned": {}, "kd_only": {"training": {"loss": {"kd_weight": 1.0}}},
                          "random_init": {"init": "random"}}
    recipe["reference"] = "pruned"  # the YAML writer sorts keys: name the reference rather than rely on order
    recipe.update(over)
    return recipe


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A random 8-layer Qwen3-Next HF teacher with one MTP depth and the toy train/calibration/held-out data."""
    root = tmp_path_factory.mktemp("variants")
    build("chain", root)
    return root


@pytest.fixture(scope="module")
def study(assets: Path) -> Path:
    work = assets / "study"
    proc = cli("run", str(write_recipe(assets, "study", _study(assets))), "--workdir", str(work), "--no-progress",
               timeout=1800)
    assert "comparison of the variants" in proc.stdout, proc.stdout[-3000:]
    return work


# ---- validation -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variants, message", [
    ({"a": {}, "b": {"colour": "red"}}, "variant 'b': unknown keys ['colour']"),
    ({"a": {}, "b": {"target": {"num_experts": 16}}}, "variant 'b': "),
    ({"a": {}, "b": {"init": "zeros"}}, "variant 'b': init must be one of ['pruned', 'random']"),
    ({"a": {}, "shared": {}}, "variant 'shared': the name is reserved"),
    ({"a": {}, "b": {"variants": {}}}, "variant 'b': ['variants'] cannot be set by a variant"),
    ({"a": {}, "b": {"training": {"loss": {"kd_weight": 2.0}}}}, "variant 'b': "),
    ([], "variants: give a mapping"),
])
def test_bad_variants_are_refused_before_compute(assets: Path, variants, message: str) -> None:
    recipe = _study(assets)
    recipe["variants"] = variants
    recipe.pop("reference", None)
    with pytest.raises(RecipeError) as err:
        load_study(write_recipe(assets, "bad_variants", recipe))
    assert message in str(err.value)


def test_unknown_lm_eval_task_is_refused_before_compute(assets: Path) -> None:
    recipe = _study(assets)
    recipe["evaluation"]["tasks"] = ["wiki_continuation", "no_such_task"]
    with pytest.raises(RecipeError, match="task no_such_task: unknown"):
        load_study(write_recipe(assets, "bad_task", recipe))


def test_benchmark_table_shows_retention_vs_the_teacher() -> None:
    from megatron_slim.run.report import benchmark_table

    teacher = {"tasks": {"wiki_cloze": {"acc": 0.5, "perplexity": 4.0},
                         "wiki_continuation": {"acc": 0.8, "acc_norm": 0.9}}}
    student = {"tasks": {"wiki_cloze": {"acc": 0.25, "perplexity": 10.0},
                         "wiki_continuation": {"acc": 0.4, "acc_norm": 0.9}}}
    table = benchmark_table([("teacher", teacher), ("student", student), ("not finished", None)], teacher)
    lines = table.splitlines()
    assert lines[0] == ("| model | wiki_cloze acc | wiki_cloze perplexity | wiki_continuation acc | "
                        "wiki_continuation acc_norm |")
    assert lines[2] == "| teacher | 0.5 | 4 | 0.8 | 0.9 |"
    # a perplexity is lower-is-better: shown as a multiple of the teacher's, not as a retained share
    assert lines[3] == "| student | 0.25 (50%) | 10 (2.5x) | 0.4 (50%) | 0.9 (100%) |"
    assert lines[4] == "| not finished |  |  |  |  |"
    assert benchmark_table([("teacher", {"loss": 1.0})], None) == ""


def test_unknown_reference_and_variant_are_named(assets: Path) -> None:
    with pytest.raises(RecipeError, match="reference 'nope' is not one of the variants"):
        load_study(write_recipe(assets, "bad_reference", _study(assets, reference="nope")))
    path = write_recipe(assets, "ok", _study(assets))
    proc = cli("run", str(path), "--workdir", str(assets / "never"), "--variant", "nope", check=False)
    assert proc.returncode == 2 and "no variant 'nope'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (assets / "never").exists()


def test_variants_deep_merge_over_the_recipe(assets: Path) -> None:
    study = load_study(write_recipe(assets, "merge", _study(assets)))
    assert study.variants == ["kd_only", "pruned", "random_init"] and study.reference == "pruned"  # file order
    kd = study.recipe("kd_only").stages[0].training.sections
    assert kd["loss"]["kd_weight"] == 1.0 and kd["optimizer"]["lr"] == 3e-3  # merged, the rest kept
    assert study.recipe("pruned").stages[0].training.sections["loss"]["kd_weight"] == 0.5
    assert study.recipe("random_init").init == "random" and study.recipe("pruned").init == "pruned"


def test_list_stages_and_dry_run_show_the_variants(assets: Path) -> None:
    path = write_recipe(assets, "listed", _study(assets))
    proc = cli("run", str(path), "--workdir", str(assets / "w"), "--list-stages")
    assert proc.stdout.split() == ["shared", "kd_only/one_shot", "pruned/one_shot", "random_init/one_shot"]
    # launch.sh --chain --cpu-partition: the shared steps' jobs (the pruning variants share their pruning, and
    # its evaluation, on a CPU node), then each variant's own chain (random init builds its student on the GPUs)
    proc = cli("run", str(path), "--workdir", str(assets / "w"), "--list-jobs")
    assert proc.stdout.split() == [
        "shared.prepare:cpu", "shared.one_shot.importance:gpu", "shared.one_shot.prune:cpu",
        "shared.one_shot.eval_pruned:gpu", "kd_only/one_shot:gpu", "kd_only/final.export:cpu", "pruned/one_shot:gpu",
        "pruned/final.export:cpu", "random_init/one_shot:gpu", "random_init/final.export:cpu"]
    proc = cli("run", str(path), "--workdir", str(assets / "w"), "--dry-run")
    lines = proc.stdout.splitlines()
    assert "variant pruned" in proc.stdout and "[reference]" in proc.stdout
    importance = [ln for ln in lines if "one_shot/importance" in ln]
    assert len(importance) == 3 and all(" shared importance@" in ln for ln in importance)  # random_init plans too
    prune = [ln for ln in lines if "one_shot/prune" in ln]
    assert len(prune) == 2 and all(" shared prune@" in ln for ln in prune)  # pruned, kd_only
    assert not any("one_shot/init" in ln and "shared" in ln for ln in lines)
    assert not (assets / "w").exists()


# ---- execution --------------------------------------------------------------------------------------------------
def test_shared_steps_run_once(study: Path) -> None:
    shared = json.loads((study / "shared" / "state.json").read_text())["steps"]
    kinds = sorted(record.split("@")[0] for record in shared)
    # teacher conversion, data, teacher evaluation, importance and plan for all three (random init builds the
    # planned architecture); prune and eval_pruned for pruned + kd_only
    assert kinds == sorted(["teacher", "data", "eval_teacher", "importance", "plan", "prune", "eval_pruned"])
    assert all(entry["status"] == "done" and entry["attempts"] == 1 for entry in shared.values())
    for name in ("pruned", "kd_only", "random_init"):
        own = json.loads((study / "variants" / name / "state.json").read_text())["steps"]
        assert not any(step.startswith("prepare/") for step in own)  # recorded once, in shared/
        assert own["one_shot/distill"]["status"] == own["final/report"]["status"] == "done"
    own = json.loads((study / "variants" / "random_init" / "state.json").read_text())["steps"]
    assert "one_shot/init" in own and "one_shot/prune" not in own and "one_shot/eval_pruned" in own
    assert "one_shot/importance" not in own  # shared


def _hf(study: Path, ckpt: Path, out: Path) -> dict[str, torch.Tensor]:
    cli("export", "--mcore", str(ckpt), "--out", str(out), "--no-progress")
    return load_file(str(out / "model.safetensors"))


def test_random_init_has_the_pruned_shapes_and_other_weights(study: Path, tmp_path: Path) -> None:
    shared = json.loads((study / "shared" / "state.json").read_text())["steps"]
    pruned = study / "shared" / next(r for r in shared if r.startswith("prune@")).split("@")[1] / "one_shot/pruned"
    random = study / "variants" / "random_init" / "one_shot" / "init"
    a, b = _hf(study, pruned, tmp_path / "pruned"), _hf(study, random, tmp_path / "random")
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a)
    weights = [k for k in a if k.endswith("proj.weight")]
    assert weights and not any(torch.equal(a[k], b[k]) for k in weights)
    assert json.loads((random / "model_config.json").read_text()) == \
        json.loads((pruned / "model_config.json").read_text())


def test_evaluation_along_distillation(study: Path) -> None:
    records = [json.loads(ln) for ln in
               (study / "variants" / "pruned" / "one_shot" / "train" / "eval.jsonl").read_text().splitlines()]
    assert [r["consumed_tokens"] for r in records] == [0, 2 * 256, 4 * 256]  # start, every 512 tokens, end
    windows = {len(r["window_losses"]) for r in records}
    assert windows == {256 // 32}  # the same held-out windows every time


def test_comparison_report(study: Path) -> None:
    report = (study / "report" / "compare.md").read_text()
    for row in ("| teacher |", "| pruned (reference) |", "| kd_only |", "| random_init |", "MTP accept@2"):
        assert row in report, report
    assert (study / "report" / "loss_vs_tokens.png").stat().st_size > 1000
    compare = json.loads((study / "report" / "compare.json").read_text())
    ref = json.loads((study / "variants" / "pruned" / "one_shot" / "eval.json").read_text())
    for name in ("kd_only", "random_init"):
        ev = json.loads((study / "variants" / name / "one_shot" / "eval.json").read_text())
        assert len(ev["window_losses"]) == len(ref["window_losses"])
        direct = paired_difference(ev["window_losses"], ref["window_losses"])
        diff = compare["variants"][name]["diff_vs_reference"]
        assert diff["mean"] == pytest.approx(direct.mean) and diff["se"] == pytest.approx(direct.se)
        assert diff["significant"] == direct.significant
    assert compare["variants"]["pruned"]["diff_vs_reference"] is None
    for name in ("kd_only", "pruned", "random_init"):  # every variant trained the same tokens
        assert compare["variants"][name]["tokens_trained"] == STEPS * 8 * 32


def test_variants_read_the_same_samples(study: Path) -> None:
    """Every variant (random init included) distils on the same range of the same data stream: equal data
    sections in their run configs (blend, split, seed, stream length, offset) and equal recorded sample ranges."""
    data, ranges = [], []
    for name in ("pruned", "kd_only", "random_init"):
        stage = study / "variants" / name / "one_shot"
        data.append(yaml.safe_load((stage / "train.yaml").read_text())["data"])
        ranges.append(RunState.read(study / "variants" / name).outputs("one_shot/distill")["data_samples"])
    assert data[0] == data[1] == data[2] and data[0]["stream_samples"] == STEPS * 8
    assert ranges == [[0, STEPS * 8]] * 3


def test_killed_variant_resumes_to_the_same_weights(assets: Path, study: Path) -> None:
    """kill -9 the kd_only variant once its distillation has a checkpoint, rerun that variant: the same exported
    weights as the uninterrupted study, bit for bit."""
    work = assets / "study_killed"
    shutil.copytree(study, work)
    state_path = work / "variants" / "kd_only" / "state.json"
    state = json.loads(state_path.read_text())
    steps = list(state["steps"])
    for name in steps[steps.index("one_shot/distill"):]:
        del state["steps"][name]
    state_path.write_text(json.dumps(state))
    for later in ("one_shot/train", "one_shot/eval.json", "export", "report"):
        path = work / "variants" / "kd_only" / later
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    cmd = [sys.executable, "-m", "megatron_slim.cli", "run", str(assets / "study.yaml"), "--workdir", str(work),
           "--variant", "kd_only", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = work / "variants" / "kd_only" / "one_shot" / "train" / "latest"
    try:
        deadline = time.time() + 900
        while not latest.is_file() and proc.poll() is None:
            assert time.time() < deadline
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert json.loads(state_path.read_text())["steps"]["one_shot/distill"]["status"] == "running"
    out = cli("run", str(assets / "study.yaml"), "--workdir", str(work), "--variant", "kd_only", "--no-progress",
              timeout=900)
    assert "resumed from" in out.stdout and "skip  variant kd_only: prepare/teacher (done, shared)" in out.stdout

    def final(root: Path) -> dict[str, torch.Tensor]:
        hf = root / "variants" / "kd_only" / "export" / "hf"
        return load_file(str(hf / "model.safetensors"))

    resumed, full = final(work), final(study)
    assert resumed.keys() == full.keys() and all(torch.equal(resumed[k], full[k]) for k in full)
    curve = lambda root: (root / "variants" / "kd_only" / "one_shot" / "train" / "eval.jsonl").read_text()  # noqa: E731
    assert curve(work) == curve(study)
