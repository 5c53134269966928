"""`megatron-slim run`: recipe validation before compute, presets, a two-stage run end to end (report, export),
idempotent reruns, and a run killed mid-distillation that resumes to the same final checkpoint."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from megatron_slim.run.recipe_check import load_recipe
from megatron_slim.run.recipe_parse import parse_recipe
from megatron_slim.run.recipe_schema import RecipeError
from megatron_slim.run.state import RunState
from support.run_assets import build, recipe as chain_recipe, write_recipe as _write
from support.train_assets import cli


def _recipe(root: Path, **over) -> dict:
    """The launch tests' two-stage recipe (8 -> 4 layers, then experts/hidden), 6 steps of 8 x 32 tokens per stage,
    with a checkpoint every 2 steps (the kill test needs one mid-stage) and MTP acceptance in the evaluation."""
    recipe = chain_recipe(root, steps_per_stage=6, name="tiny", importance={"tokens": 512},
                          evaluation={"tokens": 512, "mtp_k": 2, "mtp_prompts": 4, "gen_tokens": 6})
    recipe["training"]["checkpoint"] = {"save_interval": 2, "keep_last": 2}
    recipe.update(over)
    return recipe


# the efficiency table's measurement, as small as it goes: the run test checks that it reaches the report
INFERENCE = {"batch": 1, "prompt_len": 16, "gen_len": 4, "dtype": "float32", "device": "cpu", "warmup": 0,
             "repeats": 1}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A random 8-layer Qwen3-Next HF teacher with one MTP depth and the toy train/calibration/held-out data."""
    root = tmp_path_factory.mktemp("run")
    build("chain", root)
    return root


@pytest.fixture(scope="module")
def finished(assets: Path) -> Path:
    """One uninterrupted two-stage run."""
    work = assets / "work_full"
    proc = cli("run", str(_write(assets, "recipe", _recipe(assets, inference=INFERENCE))), "--workdir", str(work),
               "--no-progress", timeout=1200)
    assert "done  final/report" in proc.stdout
    return work


def _final_weights(work: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(RunState.read(work).outputs("final/export")["hf"]) / "model.safetensors"))


# ---- validation -------------------------------------------------------------------------------------------------
def test_presets_derive_stages(assets: Path) -> None:
    recipe = parse_recipe(_recipe(assets), assets)
    assert [s.name for s in recipe.stages] == ["depth", "width"]
    depth, width = recipe.stages
    assert depth.target.num_layers == 4 and depth.target.num_experts is None and depth.target.hidden_size is None
    assert (width.target.num_experts, width.target.hidden_size, width.target.moe_ffn_hidden_size) == (4, 48, 16)
    assert depth.training.train_tokens == width.training.train_tokens == 6 * 8 * 32
    assert depth.training.sections["optimizer"]["lr"] == 3e-3  # shared training sections reach every stage
    one = parse_recipe(_recipe(assets, preset="one_shot"), assets)
    assert [s.name for s in one.stages] == ["one_shot"] and one.stages[0].target.hidden_size == 48
    assert one.stages[0].training.train_tokens == 6 * 8 * 32 * 2


def test_stage_seed_and_final_target_are_fields(assets: Path) -> None:
    """Each stage trains (and a random student initialises) from its explicit seed: the recipe's `train.seed`, a
    stage's own, else the one default; the recipe's `target` is a typed field, part of the work dir's digest."""
    from megatron_slim.runtime.seed import DEFAULT_SEED

    recipe = parse_recipe(_recipe(assets), assets)
    assert [s.training.seed for s in recipe.stages] == [recipe.source["training"]["train"]["seed"]] * 2
    assert recipe.final_target is not None and recipe.final_target.num_experts == 4
    assert "_final_target" not in recipe.source  # the parsed YAML stays as written
    raw = _recipe(assets)
    del raw["training"]["train"]["seed"]
    unseeded = parse_recipe(raw, assets)
    assert [s.training.seed for s in unseeded.stages] == [DEFAULT_SEED] * 2 and unseeded.digest != recipe.digest
    smaller = parse_recipe(_recipe(assets) | {"target": dict(_recipe(assets)["target"], num_experts=2)}, assets)
    assert smaller.final_target.num_experts == 2 and smaller.digest != recipe.digest


@pytest.mark.parametrize("change, message", [
    ({"colour": "red"}, "unknown keys ['colour']"),
    ({"teacher": "/nonexistent/teacher"}, "teacher /nonexistent/teacher does not exist"),
    ({"target": {"num_layers": 3}}, "num_layers=3 breaks"),
    ({"target": {"num_layers": 4, "num_experts": 16}}, "num_experts=16 is larger than the source's 8"),
    ({"target": {"num_layers": 4, "widht": 3}}, "unknown keys ['widht']"),
    ({"training": {"optimizer": {"lrr": 1.0}}}, "unknown keys ['lrr']"),
    ({"training": {"model": {"checkpoint": "x"}}}, "['model'] are set by the run"),
    ({"data": {"train": [[1.0, "/nonexistent/prefix"]], "calibration": "c", "heldout": "h"}}, "do not exist"),
    ({"preset": "two_shot"}, "preset must be one of"),
    ({"parallel": {"cp": 2}}, "parallel.cp: a recipe's steps run tp/pp/ep layouts only"),
    ({"parallel": {"dp": 2}}, "parallel: unknown keys ['dp']"),
    # the teacher runs importance and evaluation at the recipe's layout, which only the stage targets were held to
    ({"parallel": {"ep": 3}, "nproc": 3},
     "parallel layout does not fit the model: num_experts=8 is not divisible by ep=3"),
    ({"inference": {"batch": 0, "beam": 2}}, "inference: unknown keys ['beam']"),
    ({"inference": {"batch": 0}}, "inference.batch must be an integer >= 1, got 0"),
    ({"inference": {"dtype": "int4"}}, "inference.dtype must be one of"),
    ({"inference": {}, "export": False}, "inference measures the exported student: it needs export: true"),
    ({"inference": {"engines": ["transformers", "tgi"]}}, "inference.engines must be distinct entries of"),
    ({"inference": {"engines": ["vllm"], "vllm_python": "/nonexistent/python3.11"}},
     "inference.vllm_python /nonexistent/python3.11: no such interpreter"),
    ({"inference": {"engines": ["transformers", "vllm"], "vllm_python": sys.executable, "device": "cpu"}},
     "inference.engines: vLLM refuses"),  # the tiny Qwen3-Next teacher: head dims vLLM's CPU kernels reject
    ({"preset": None, "train_tokens": None, "stages": [
        {"name": "a", "target": {"num_layers": 4}, "training": {"train": {"train_iters": 1}}}]},
     "the stages do not end at `target`"),
    ({"preset": None, "train_tokens": None, "target": None, "stages": [
        {"name": "final", "target": {}, "training": {"train": {"train_iters": 1}}}]}, "reserved"),
])
def test_recipe_errors_before_compute(assets: Path, change: dict, message: str) -> None:
    recipe = _recipe(assets)
    for key, value in change.items():
        if value is None:
            recipe.pop(key, None)
        else:
            recipe[key] = value
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(assets, "bad", recipe))
    assert message in str(err.value)


@pytest.mark.parametrize("section, change, message", [
    ("importance", {"micro_batch": 0}, "importance.micro_batch must be >= 1"),
    ("importance", {"tokens": 0}, "importance.tokens must be >= 1"),
    ("evaluation", {"tokens": -1}, "evaluation.tokens must be >= 1"),
    ("evaluation", {"micro_batch": 0}, "evaluation.micro_batch must be >= 1"),
    ("evaluation", {"mtp_prompts": 0}, "evaluation.mtp_prompts must be >= 1"),
    ("evaluation", {"mtp_k": -1}, "evaluation.mtp_k must be >= 0"),
    ("evaluation", {"mtp_k": 6}, "evaluation.gen_tokens (6) must exceed evaluation.mtp_k (6)"),
    ("evaluation", {"tasks": ["wiki_cloze"], "num_fewshot": -1}, "evaluation.num_fewshot must be >= 0"),
    ("evaluation", {"tasks": ["wiki_cloze"], "limit": 0}, "evaluation.limit must be > 0"),
    ("data", {"seq_length": 1}, "data.seq_length must be >= 2"),
    ("parallel", {"ep": 0}, "parallel.ep must be >= 1"),
])
def test_recipe_refuses_what_the_workers_refuse(assets: Path, section: str, change: dict, message: str) -> None:
    """The importance and evaluation sections build the jobs the steps run, and each job's own validation runs at
    parse time, naming the recipe key: nothing a worker would refuse reaches the teacher conversion."""
    recipe = _recipe(assets)
    recipe[section] = dict(recipe.get(section) or {}) | change
    with pytest.raises(RecipeError) as err:
        parse_recipe(recipe, assets)
    assert message in str(err.value)


def test_recipe_sections_take_the_jobs_defaults() -> None:
    """A recipe section's setting defaults to the command's, except those the recipe derives on purpose."""
    from megatron_slim.engines.bench_inference_job import BenchInferenceJob
    from megatron_slim.engines.evaluate_job import EvaluateJob
    from megatron_slim.engines.importance_job import ImportanceJob
    from megatron_slim.run.recipe_schema import EvaluationSection, ImportanceSection, InferenceSection

    own = {"tokens", "prompt_len", "tasks"}  # recipe budgets; evaluation.prompt_len 0: half data.seq_length
    for section, job in ((ImportanceSection, ImportanceJob), (EvaluationSection, EvaluateJob)):
        jobs = {f.name: f.default for f in dataclasses.fields(job)}
        shared = [f for f in dataclasses.fields(section) if f.name in jobs and f.name not in own]
        assert shared and all(f.default == jobs[f.name] for f in shared), section
    jobs = {f.name: f.default for f in dataclasses.fields(BenchInferenceJob)}
    assert all(f.default == jobs[f.name] for f in dataclasses.fields(InferenceSection)
               if f.default is not dataclasses.MISSING)
    assert InferenceSection().job(models=()) == BenchInferenceJob(models=())  # the factory defaults too (engines)


def test_dry_run_refuses_a_worker_setting(assets: Path) -> None:
    recipe = _recipe(assets, importance={"micro_batch": 0}, evaluation={"tokens": -1})
    work = assets / "never_dry"
    proc = cli("run", str(_write(assets, "bad_job", recipe)), "--workdir", str(work), "--dry-run", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "importance.micro_batch must be >= 1" in proc.stderr and "evaluation.tokens must be >= 1" in proc.stderr
    assert not work.exists()


@pytest.mark.parametrize("change, message", [
    ({"add_mtp_layers": 1}, "stage 'depth': loss.mtp_kd_source: mtp needs a teacher with at least the student's 2 "
                            "MTP depths; the teacher "),
    ({"target": dict(chain_recipe(Path("."))["target"], mtp_layers=0)},
     "stage 'width': loss.mtp_kd_source: mtp, but the student of this stage has no MTP heads"),
])
def test_recipe_refuses_what_the_trainer_refuses_of_the_pair(assets: Path, change: dict, message: str) -> None:
    """MTP distillation from the teacher's own MTP depths needs them in the teacher and MTP heads in the stage's
    student: the trainer's check, made on the chained stage configs before the teacher is converted."""
    recipe = _recipe(assets, **change)
    recipe["training"]["loss"] = dict(recipe["training"]["loss"], mtp_kd_source="mtp")
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(assets, "bad_pair", recipe))
    assert message in str(err.value)


def test_cli_reports_every_problem_before_compute(assets: Path) -> None:
    recipe = _recipe(assets, colour="red", preset="two_shot")
    del recipe["data"]["calibration"]
    work = assets / "never"
    proc = cli("run", str(_write(assets, "bad_cli", recipe)), "--workdir", str(work), check=False)
    assert proc.returncode == 2
    for message in ("unknown keys ['colour']", "data.calibration is required", "preset must be one of"):
        assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not work.exists()  # nothing ran, nothing was written


def test_pretokenized_jsonl_data_is_prepared_like_preprocess(assets: Path, tmp_path: Path) -> None:
    """{"tokens": [...]} jsonl passes validation (it used to pass --dry-run and then crash with KeyError 'text'), and
    the run's data preparation writes the ids `preprocess --tokenizer none` writes, with the teacher's EOS."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_slim.engines.preprocess_job import PreprocessJob, run_preprocess

    recipe = _recipe(assets)
    recipe["data"]["train"] = str(assets / "train.jsonl")
    load_recipe(_write(assets, "pretokenized", recipe))
    run_preprocess(PreprocessJob(inputs=(str(assets / "train.jsonl"),), output_prefix=str(tmp_path / "run"),
                                 tokenizer=str(assets / "teacher_hf"), vocab_size=128, eod_id=127))
    ours, ref = IndexedDataset(str(tmp_path / "run")), IndexedDataset(str(assets / "train"))
    assert len(ours) == len(ref) == 200
    assert all(np.array_equal(ours[i], ref[i]) for i in range(len(ref)))


@pytest.mark.parametrize("line, message", [
    ('{"text": "the cat sat on the mat"}', "train_bad.jsonl:1: the text tokenizes to no token at all"),
    ('{"tokens": [1, 2, 300]}', "train_bad.jsonl:1: token id 300 is outside the model's vocabulary of 128"),
    ('{"tokens": [1, 2', "train_bad.jsonl:1: not valid JSON"),
])
def test_bad_training_data_is_refused_before_compute(assets: Path, line: str, message: str) -> None:
    """The teacher has no tokenizer files: text data used to become one end-of-document token per document, with
    prepare/data recorded done. Now the recipe is refused before anything runs, and so is preparation itself."""
    from megatron_slim.engines.preprocess_job import PreprocessJob, run_preprocess
    from megatron_slim.errors import UserError

    (assets / "train_bad.jsonl").write_text(line + "\n")
    recipe = _recipe(assets)
    recipe["data"]["train"] = str(assets / "train_bad.jsonl")
    work = assets / "never_bad"
    proc = cli("run", str(_write(assets, "bad_data", recipe)), "--workdir", str(work), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"data.train: {assets / message}" in proc.stderr
    assert not work.exists()
    with pytest.raises(UserError, match=message.split(":", 1)[1].strip()):
        run_preprocess(PreprocessJob(inputs=(str(assets / "train_bad.jsonl"),), output_prefix=str(assets / "bad"),
                                     tokenizer=str(assets / "teacher_hf"), vocab_size=128, eod_id=127))


def test_list_stages(assets: Path) -> None:
    proc = cli("run", str(_write(assets, "recipe_list", _recipe(assets))), "--workdir", str(assets / "w"),
               "--list-stages")
    assert proc.stdout.split() == ["depth", "width"]
    # the jobs of `launch.sh --chain --cpu-partition P`: heavy single-process steps on CPU nodes, the rest on GPUs
    proc = cli("run", str(_write(assets, "recipe_jobs", _recipe(assets, inference=INFERENCE))), "--workdir",
               str(assets / "w"), "--list-jobs")
    assert proc.stdout.split() == ["prepare:cpu", "depth.importance:gpu", "depth.prune:cpu", "depth:gpu",
                                   "width.prune:cpu", "width:gpu", "final.export:cpu", "final.bench_inference:gpu"]


# ---- execution --------------------------------------------------------------------------------------------------
def test_run_end_to_end(finished: Path) -> None:
    state = json.loads((finished / "state.json").read_text())["steps"]
    assert all(entry["status"] == "done" for entry in state.values()), state
    teacher = json.loads((finished / "teacher" / "eval.json").read_text())
    for stage in ("depth", "width"):
        before = json.loads((finished / stage / "eval_pruned.json").read_text())
        after = json.loads((finished / stage / "eval.json").read_text())
        assert before["tokens"] == after["tokens"] == teacher["tokens"]  # the same held-out tokens for everyone
        assert after["loss"] < before["loss"], (stage, before, after)  # distillation healed the pruning damage
    cfg = json.loads((finished / "export" / "hf" / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_experts"]) == (4, 48, 4)
    report = (finished / "report" / "report.md").read_text()
    for row in ("| teacher |", "| depth: pruned, before training |", "| width: distilled |"):
        assert row in report
    for png in ("losses.png", "retention.png"):
        assert (finished / "report" / png).stat().st_size > 1000
    # the efficiency table: the HF teacher and the exported student, each measured in its own process
    bench = json.loads((finished / "export" / "bench_inference.json").read_text())
    teacher_row, student_row = bench["models"]
    assert (teacher_row["label"], student_row["label"]) == ("teacher", "student")
    assert student_row["path"] == str(finished / "export" / "hf")
    assert 0 < student_row["params"] < teacher_row["params"]
    assert all(m["prefill_s"] > 0 and m["decode_tokens_per_s"] > 0 for m in bench["models"])
    assert "## Deployment efficiency" in report and "| student |" in report and "vs teacher" in report


def test_stages_read_one_data_stream(finished: Path, tmp_path: Path) -> None:
    """Stage `width` starts where `depth` stopped in one shuffle of the corpus: contiguous sample ranges in the
    state, run configs that build the same stream, and no window of the corpus read by both stages."""
    from megatron_slim.train.config import run_config_from_dict
    from megatron_slim.train.data import TokenizerInfo, build_datasets

    state = RunState.read(finished)
    assert [state.outputs(f"{s}/distill")["data_samples"] for s in ("depth", "width")] == [[0, 48], [48, 96]]
    data = [run_config_from_dict(yaml.safe_load((finished / s / "train.yaml").read_text())).data
            for s in ("depth", "width")]
    assert [d.sample_offset for d in data] == [0, 48]
    assert dataclasses.replace(data[0], sample_offset=48) == data[1] and data[0].stream_samples == 96
    d = data[0]
    train = build_datasets(d.blend, d.split, d.seq_length, (d.stream_samples, 8, 0), d.seed,
                           TokenizerInfo(vocab_size=128, eod=127), str(tmp_path), False)[0]

    def windows(start: int, end: int) -> set[tuple[int, int]]:  # (document position, offset) each sample starts at
        return {tuple(int(x) for x in train.sample_index[train.shuffle_index[i]]) for i in range(start, end)}

    depth, width = windows(0, 48), windows(48, 96)
    assert len(depth) == len(width) == 48 and not depth & width


def test_dry_run_refuses_a_too_small_corpus(assets: Path) -> None:
    """The toy corpus (~8K tokens) cannot feed 10^5 tokens at data.max_epochs 1: the dry run names the dataset;
    a recipe it can feed prints each dataset's tokens available / requested / epochs."""
    big = _write(assets, "recipe_big", _recipe(assets, train_tokens=100_000))
    proc = cli("run", str(big), "--workdir", str(assets / "w_big"), "--dry-run", check=False)
    assert proc.returncode == 2 and f"of {assets / 'train'}" in proc.stderr, proc.stderr[-2000:]
    assert "data.max_epochs 1" in proc.stderr
    ok = cli("run", str(_write(assets, "recipe_dry", _recipe(assets))), "--workdir", str(assets / "w_dry"),
             "--dry-run")
    assert "data stream: 96 samples of 32 tokens; depth [0, 48), width [48, 96)" in ok.stdout
    assert f"{assets / 'train'}: weight 1, " in ok.stdout and "3,072 requested" in ok.stdout, ok.stdout


def test_export_matches_megatron_student(finished: Path) -> None:
    """The exported HF student computes what the final Megatron checkpoint computes (transformers vs megatron)."""
    state = RunState.read(finished)
    proc = cli("verify", "--hf", state.outputs("final/export")["hf"], "--mcore",
               state.outputs("width/distill")["checkpoint"], "--json")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    heads = [h for h in result if h != "layout"]
    assert "main" in heads and len(heads) == 2, result  # the main head and the student's MTP head
    for head in heads:
        assert result[head]["top1_agreement"] == 1.0 and result[head]["max_abs_diff"] < 1e-4, result


def test_export_command_writes_the_runs_student(finished: Path, tmp_path: Path) -> None:
    """`export --run` (the final training checkpoint, iter_* dir) gives the run's own export, bit for bit."""
    cli("export", "--run", str(finished), "--out", str(tmp_path / "hf"), "--no-progress")
    ours = load_file(str(tmp_path / "hf" / "model.safetensors"))
    run = _final_weights(finished)
    assert ours.keys() == run.keys() and all(torch.equal(ours[k], run[k]) for k in run)


def test_rerun_skips_finished_steps(assets: Path, finished: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in (finished / "export" / "hf").iterdir()}
    proc = cli("run", str(assets / "recipe.yaml"), "--workdir", str(finished), "--no-progress")
    assert "start" not in proc.stdout and proc.stdout.count("skip") == 3 + 2 * 6 + 3
    assert before == {p: p.stat().st_mtime_ns for p in (finished / "export" / "hf").iterdir()}


def test_other_recipe_refuses_workdir(assets: Path, finished: Path) -> None:
    path = _write(assets, "other", _recipe(assets, name="other"))
    proc = cli("run", str(path), "--workdir", str(finished), check=False)
    assert proc.returncode == 2 and "different recipe" in proc.stderr


def _rewind(finished: Path, work: Path, first_step: str) -> None:
    """`work`: a copy of the finished run whose state forgets `first_step` and every step after it, as if the run
    were about to start that step (earlier steps' outputs stay where the finished run wrote them)."""
    shutil.copytree(finished, work, ignore=shutil.ignore_patterns("state.json"))
    state = json.loads((finished / "state.json").read_text())
    names = list(state["steps"])
    for name in names[names.index(first_step):]:
        del state["steps"][name]
    (work / "state.json").write_text(json.dumps(state))


def test_killed_run_resumes_to_same_result(assets: Path, finished: Path) -> None:
    """kill -9 once the second stage's distillation has a checkpoint, rerun: the same final weights, bit for bit.
    (The run starts from the finished run rewound to the start of that distillation.)"""
    work = assets / "work_killed"
    _rewind(finished, work, "width/distill")
    (assets / "elsewhere").mkdir()
    for written_later in ("width/train", "export", "report"):
        shutil.rmtree(work / written_later)
    cmd = [sys.executable, "-m", "megatron_slim.cli", "run", str(assets / "recipe.yaml"), "--workdir", str(work),
           "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 1200
        while not (work / "width" / "train" / "latest").is_file() and proc.poll() is None:
            assert time.time() < deadline
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    state = json.loads((work / "state.json").read_text())["steps"]
    assert state["width/distill"]["status"] == "running"  # killed mid-stage
    # resumed from another directory, the work dir named relative to it (state.json paths are the work dir's)
    out = cli("run", str(assets / "recipe.yaml"), "--workdir", os.path.relpath(work, assets / "elsewhere"),
              "--no-progress", timeout=1200, cwd=assets / "elsewhere")
    assert "skip  depth/distill" in out.stdout and "resumed from" in out.stdout
    assert RunState.read(work).outputs("width/distill")["data_samples"] == [48, 96]  # the same stream range
    resumed, full = _final_weights(work), _final_weights(finished)
    assert resumed.keys() == full.keys()
    for key in full:
        assert torch.equal(resumed[key], full[key]), key


def test_chain_job_runs_only_its_steps(assets: Path, finished: Path) -> None:
    """`run --job NAME` (one job of launch.sh's chain) refuses to start before the jobs it reads from are done, then
    runs exactly its own steps: here the second stage's pruning, bit-identical to the uninterrupted run's."""
    work = assets / "work_jobs"
    _rewind(finished, work, "width/prune")
    proc = cli("run", str(assets / "recipe.yaml"), "--workdir", str(work), "--job", "width", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "job 'width' needs the jobs before it finished: step width/eval_pruned reads ['width/prune']" in proc.stderr
    out = cli("run", str(assets / "recipe.yaml"), "--workdir", str(work), "--job", "width.prune", "--no-progress")
    assert re.findall(r"\[run\] start (\S+)", out.stdout) == ["width/prune"], out.stdout
    state = json.loads((work / "state.json").read_text())["steps"]
    assert state["width/prune"]["status"] == "done" and "width/eval_pruned" not in state
    pruned, reference = work / "width" / "pruned", finished / "width" / "pruned"
    files = sorted(p.relative_to(pruned) for p in pruned.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    assert any(f.suffix == ".distcp" for f in files), files
    for f in files:
        if f.suffix == ".distcp":  # the weights
            assert (pruned / f).read_bytes() == (reference / f).read_bytes(), f


def _two_nodes(*args: str, timeout: int = 600) -> list[tuple[int, str]]:
    """`megatron-slim ARGS` launched as a job of two nodes with one rank each: two torchrun agents (static
    rendezvous on this host), each its node's launcher. Returns each agent's (exit status, output)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
                                str(rank), "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port",
                                str(port), "-m", "megatron_slim.cli", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env) for rank in (0, 1)]
    try:
        return [(agent.wait(timeout=timeout), agent.stdout.read() if agent.stdout else "") for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()


def test_multi_node_job_refuses_single_process_steps(assets: Path, tmp_path: Path) -> None:
    """In a job that spans two nodes, `run` refuses the teacher conversion (the CPU job `prepare` of launch.sh's
    chain does it) on every rank before anything runs; --allow-single-process-steps runs it there anyway."""
    work, recipe = tmp_path / "work", _write(tmp_path, "recipe", _recipe(assets))  # not the `finished` run's file
    results = _two_nodes("run", str(recipe), "--workdir", str(work), "--no-progress")
    for code, out in results:
        assert code != 0, out[-3000:]
        assert ("step prepare/teacher is single-process work that would keep the other GPUs of this 2-node job "
                "idle") in out and "--job prepare`" in out, out[-3000:]
    assert not (work / "state.json").exists() and not (work / "teacher").exists()
    results = _two_nodes("run", str(recipe), "--workdir", str(work), "--job", "prepare",
                         "--allow-single-process-steps", "--no-progress")
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    state = json.loads((work / "state.json").read_text())["steps"]
    assert {step: entry["status"] for step, entry in state.items()} == {"prepare/teacher": "done",
                                                                         "prepare/data": "done"}
    assert (work / "teacher" / "mcore").is_dir()


def _descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except FileNotFoundError:
            children = []
        out |= {int(c) for c in children}
        todo += [int(c) for c in children]
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _step_status(work: Path, step: str) -> str | None:
    try:
        return json.loads((work / "state.json").read_text())["steps"].get(step, {}).get("status")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _catches_sigterm(pid: int) -> bool:
    """Whether process `pid` has a handler installed for SIGTERM (its SigCgt mask in /proc)."""
    mask = re.search(r"^SigCgt:\s*([0-9a-f]+)$", Path(f"/proc/{pid}/status").read_text(), re.M)
    return bool(mask and int(mask.group(1), 16) >> (signal.SIGTERM - 1) & 1)


def signal_run_in(cmd: list[str], work: Path, step: str | None, log: Path) -> tuple[int, str, set[int]]:
    """Start `cmd` (a `run` into `work`), SIGTERM it as soon as `step` is running (None: as soon as it catches the
    signal, while it is still importing); (its exit status, its output, every process seen under it meanwhile:
    ranks, step children, checkpoint writers)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    seen: set[int] = set()
    try:
        deadline = time.time() + 600
        while not (_catches_sigterm(proc.pid) if step is None else _step_status(work, step) == "running"):
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            seen |= _descendants(proc.pid)
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        while proc.poll() is None:
            assert time.time() < deadline, log.read_text()[-3000:]
            seen |= _descendants(proc.pid)
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.time() + 20
    while any(_alive(p) for p in seen) and time.time() < deadline:
        time.sleep(0.05)
    return proc.returncode, log.read_text(), {p for p in seen if _alive(p)}


def test_sigterm_stops_the_run_at_the_next_safe_point(assets: Path, tmp_path: Path) -> None:
    """SIGTERM outside distillation (here: while the teacher is evaluated) lets the step finish, records it, and
    stops the run before the next step with the requeue status 75. The requeued run resumes; a SIGTERM while
    distillation sets up (it used to be lost: the trainer's own stop flag started unraised, so the stage trained to
    its end) checkpoints at the first step and exits 75, leaving no process behind."""
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "megatron_slim.cli", "run",
           str(_write(tmp_path, "recipe", chain_recipe(assets, steps_per_stage=6, preset="one_shot",
                                                       importance={"tokens": 64},
                                                       evaluation={"tokens": 64, "mtp_k": 0}))),
           "--workdir", str(work), "--no-progress"]
    code, out, survivors = signal_run_in(cmd, work, "prepare/eval_teacher", tmp_path / "first.log")
    assert code == 75, out[-3000:]
    assert _step_status(work, "prepare/eval_teacher") == "done"
    assert _step_status(work, "one_shot/importance") is None
    assert "stop  before one_shot/importance" in out and not survivors

    code, out, survivors = signal_run_in(cmd, work, "one_shot/distill", tmp_path / "second.log")
    assert code == 75, out[-3000:]
    assert "skip  prepare/eval_teacher" in out and "stop  one_shot/distill: checkpointed" in out, out[-3000:]
    assert _step_status(work, "one_shot/distill") == "interrupted"
    steps = sorted(int(p.name.split("_")[1]) for p in (work / "one_shot" / "train").glob("iter_*"))
    assert steps and steps[-1] < 12, (steps, out[-3000:])  # stopped early, with a checkpoint
    assert not survivors, survivors

    # a SIGTERM while the requeued run is still importing torch (it used to die of it: 143, not requeued)
    code, out, survivors = signal_run_in(cmd, work, None, tmp_path / "third.log")
    assert code == 75 and "stop  before one_shot/distill" in out and not survivors, out[-3000:]
    assert _step_status(work, "one_shot/distill") == "interrupted"


@pytest.mark.slow  # a two-rank run to its distillation: minutes on two cores
def test_sigterm_reaches_the_ranks_of_a_two_rank_run(assets: Path, tmp_path: Path) -> None:
    """`run` with `nproc: 2` used to exit at once on SIGTERM while its orphaned ranks finished the run: now both
    ranks checkpoint the distillation (each its shard), the run exits 75, and no rank, step child or checkpoint
    writer survives."""
    work = tmp_path / "work"
    recipe = chain_recipe(assets, steps_per_stage=6, nproc=2, preset="one_shot", importance={"tokens": 64},
                          evaluation={"tokens": 64, "mtp_k": 0})
    cmd = [sys.executable, "-m", "megatron_slim.cli", "run", str(_write(tmp_path, "recipe", recipe)), "--workdir",
           str(work), "--no-progress"]
    code, out, survivors = signal_run_in(cmd, work, "one_shot/distill", tmp_path / "run.log")
    assert code == 75, out[-3000:]
    assert _step_status(work, "one_shot/distill") == "interrupted", out[-3000:]
    step = int((work / "one_shot" / "train" / "latest").read_text())
    shards = {p.name for p in (work / "one_shot" / "train" / f"iter_{step:07d}").glob("*.distcp")}
    assert shards == {"__0_0.distcp", "__1_0.distcp"}, out[-3000:]  # each rank saved its shard
    assert step < 12 and not survivors, survivors


def test_torchrun_ranks_share_the_work_dir_lock_and_a_second_run_is_refused(assets: Path, tmp_path: Path) -> None:
    """Under torchrun (the launch.sh path) rank 0 holds the work dir's lock for its ranks (they do not lock each
    other out); a second torchrun `run` into the same work dir is refused on every rank, naming the holder, and
    leaves the first running with its lock."""
    work, recipe = tmp_path / "work", str(_write(tmp_path, "recipe", chain_recipe(assets)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}

    def torchrun(log: Path) -> subprocess.Popen:
        with open(log, "w") as out:
            return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc-per-node", "2", "-m", "megatron_slim.cli", "run", recipe, "--workdir",
                                     str(work), "--no-progress"], stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)

    first = torchrun(tmp_path / "first.log")
    try:
        deadline = time.time() + 300
        while _step_status(work, "prepare/teacher") != "running":  # both ranks are past the guard
            assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.05)
        holder = int((work / ".megatron-slim.lock").read_text().split()[0])
        assert holder in _descendants(first.pid)  # a rank of the first job, not its agent
        second = torchrun(tmp_path / "second.log")
        assert second.wait(timeout=300) != 0
        out = (tmp_path / "second.log").read_text()
        refusal = f"megatron-slim run: error: {work} is being written by another run (pid {holder} on host"
        assert out.count(refusal) == 2, out[-3000:]  # both ranks, one line each
        assert not re.search(r'File ".*megatron_slim/', out), out[-3000:]  # (torchrun's own traceback follows)
        assert first.poll() is None and (work / ".megatron-slim.lock").read_text().split()[0] == str(holder)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


# ---- the work dir: one writer, never the user's files, outputs that vanished are redone -------------------------
HOLD_WORKDIR = """
import sys
from megatron_slim.runtime.outputs import workdir_lock
with workdir_lock(sys.argv[1]):
    print("ready", flush=True)
    sys.stdin.readline()
"""


@pytest.fixture
def workdir_holder():
    """Start a real process holding a work dir's lock (as a running `run` does); yields it once it holds it."""
    procs = []

    def start(workdir: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD_WORKDIR, str(workdir)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_second_run_into_a_work_dir_refuses_naming_the_holder(assets: Path, tmp_path: Path, workdir_holder) -> None:
    """Two `run`s into one work dir used to train into one train/ while state.json kept the last writer's view."""
    work = tmp_path / "work"
    first = workdir_holder(work)
    proc = cli("run", str(_write(assets, "recipe_lock", _recipe(assets))), "--workdir", str(work), "--no-progress",
               check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"pid {first.pid} on host {socket.gethostname()}" in proc.stderr
    assert not (work / "state.json").exists() and "start" not in proc.stdout


def test_recipe_in_the_work_dir_is_never_written_back(assets: Path, tmp_path: Path) -> None:
    """`run ./recipe.yaml --workdir .` used to rewrite the user's recipe through yaml.safe_dump (comments gone):
    the run keeps its own copy, run.recipe.yaml. (`--stage nope` stops the run once it prepared the work dir.)"""
    study = _recipe(assets)
    study["variants"], study["reference"] = {"a": {}, "b": {"training": {"loss": {"kd_weight": 1.0}}}}, "a"
    text = "# my study, hand-written\n" + yaml.safe_dump(study)
    (tmp_path / "recipe.yaml").write_text(text)
    proc = cli("run", "recipe.yaml", "--workdir", ".", "--stage", "nope", "--no-progress", check=False, cwd=tmp_path)
    assert proc.returncode == 2 and "no stage 'nope'" in proc.stderr, proc.stderr[-2000:]
    assert (tmp_path / "recipe.yaml").read_text() == text
    assert yaml.safe_load((tmp_path / "run.recipe.yaml").read_text()) == study


def test_run_fresh_clears_only_a_work_dir_run_made(assets: Path, tmp_path: Path) -> None:
    recipe = _write(assets, "recipe_fresh", _recipe(assets))
    mine = tmp_path / "mine"
    (mine / "docs").mkdir(parents=True)
    (mine / "docs" / "thesis.tex").write_text("years of work")
    proc = cli("run", str(recipe), "--workdir", str(mine), "--fresh", check=False)
    assert proc.returncode == 2 and "refusing to clear" in proc.stderr, proc.stderr[-2000:]
    assert (mine / "docs" / "thesis.tex").read_text() == "years of work"


def test_finished_step_whose_outputs_vanished_is_redone(assets: Path, finished: Path) -> None:
    """Deleted outputs of a finished step used to still count as done: the step runs again, the others are
    skipped."""
    work = assets / "work_vanished"
    shutil.copytree(finished, work)
    (work / "report" / "report.md").unlink()
    proc = cli("run", str(assets / "recipe.yaml"), "--workdir", str(work), "--no-progress")
    assert "redo  final/report: its outputs are gone" in proc.stdout
    assert [line.split()[2] for line in proc.stdout.splitlines() if line.startswith("[run] start")] == [
        "final/report"]
    assert (work / "report" / "report.md").is_file()


def test_slimqwen_example_recipe_reaches_the_paper_student() -> None:
    """examples/slimqwen/recipe.yaml parses and its stages chain from the real teacher config to SlimQwen-23A2B."""
    from megatron_slim.models.registry import model_config_from_hf
    from megatron_slim.run.recipe_check import check_final, stage_configs

    root = Path(__file__).parents[1] / "examples" / "slimqwen"
    recipe = parse_recipe(yaml.safe_load((root / "recipe.yaml").read_text()), root)
    teacher = model_config_from_hf(str(root / "teacher_config.json"), mtp_num_layers=1)
    depth, width = stage_configs(recipe, teacher)
    assert (depth.num_layers, depth.hidden_size, depth.num_experts) == (36, 2048, 512)
    assert (width.num_layers, width.hidden_size, width.num_experts, width.topk) == (36, 1536, 256, 8)
    assert width.hybrid_pattern.count("*") == 9 + 1  # 9 full-attention decoder layers + the MTP layer
    check_final(recipe, width, teacher)
    assert recipe.stages[0].training.train_tokens + recipe.stages[1].training.train_tokens \
        == 400e9
