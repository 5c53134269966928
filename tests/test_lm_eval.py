"""lm-evaluation-harness on Megatron models: our `MegatronLM` against lm-eval's own HF backend (`--model hf`) on the
same requests and tasks (log-likelihoods to 1e-4 in float32, identical greedy generations and task scores) at TP1
(DP2), TP2, PP2 and EP2; the shipped Wikipedia tasks; offline and tokenizer errors; the CLI end to end."""
from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing here may touch the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_slim.errors import UserError
from megatron_slim.eval.harness import TaskSpec, check_tasks, shipped_task_names, text_tokenizer
from megatron_slim.eval.tasks import wiki_docs
from support import tiny_models
from support.dist import run_distributed
from support.hf_checkpoints import build_tiny_hf, byte_tokenizer

LAYOUTS = {"tp1": {}, "tp2": {"tp": 2}, "pp2": {"pp": 2}, "ep2": {"ep": 2}}  # 2 ranks each; the rest is DP
TASKS = ("wiki_cloze", "wiki_continuation", "wiki_perplexity", "wiki_cloze_gen")
LIMIT = 3
GEN = {"until": [".", "\n"], "max_gen_toks": 12, "do_sample": False}


def requests() -> dict[str, list[tuple]]:
    """Arguments of each request type, from the shipped tasks' documents: cloze words (one with an empty context),
    whole paragraphs longer than the context (several rolling windows each) and prompts to continue."""
    cloze = wiki_docs.cloze_docs()[:5]
    paragraphs = [d["text"] for d in wiki_docs.paragraph_docs() if len(d["text"]) > 300][:3]
    return {"loglikelihood": [(d["context"], " " + d["word"]) for d in cloze] + [("", "Paris is a city")],
            "loglikelihood_rolling": [(p,) for p in paragraphs],
            "generate_until": [(d["context"], dict(GEN)) for d in cloze[:3]] + [("The", dict(GEN))]}


def run_requests(lm, args: dict[str, list[tuple]]) -> dict[str, list]:
    from lm_eval.api.instance import Instance

    out = {}
    for kind, rows in args.items():
        reqs = [Instance(kind, {}, a, i, metadata=("t", i, 1)) for i, a in enumerate(rows)]
        out[kind] = getattr(lm, kind)(reqs)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny Mixtral over a byte tokenizer (256 bytes + EOS), its HF directory and Megatron conversion."""
    from megatron_slim.checkpoint.convert import hf_to_mcore

    root = tmp_path_factory.mktemp("lm_eval")
    model = build_tiny_hf(tiny_models.mixtral(vocab_size=258, eos_token_id=256, bos_token_id=None), seed=0)
    model.save_pretrained(root / "hf")
    byte_tokenizer().save_pretrained(root / "hf")
    hf_to_mcore(root / "hf", root / "mcore", progress=False)
    return {"root": root, "hf": root / "hf", "mcore": root / "mcore"}


@pytest.fixture(scope="module")
def hf_reference(tiny) -> dict:
    """lm-eval's HF backend, one request per batch (no padding), on the requests and on the shipped tasks."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from megatron_slim.eval.harness import SHIPPED_TASKS

    lm = HFLM(pretrained=str(tiny["hf"]), dtype="float32", device="cpu", batch_size=1)
    out = run_requests(lm, requests())
    results = simple_evaluate(model=lm, tasks=list(TASKS), limit=LIMIT, log_samples=False, bootstrap_iters=0,
                              task_manager=TaskManager(include_path=[str(SHIPPED_TASKS)]),
                              verbosity="ERROR")["results"]
    out["tasks"] = {t: {k.split(",")[0]: v for k, v in r.items() if k.endswith(",none") and "stderr" not in k}
                    for t, r in results.items()}
    return out


def layout_sweep(rank: int, world: int, mcore: str, args: dict[str, list[tuple]]) -> dict:
    """Our backend at every layout in the same processes (one: TP1 alone; two: every layout, the tasks at TP2)."""
    from megatron_slim.checkpoint.files import TOKENIZER_DIR
    from megatron_slim.checkpoint.mcore import load_model, load_model_config
    from megatron_slim.eval.harness import MegatronLM, context_length, score_tasks
    from megatron_slim.models.builder import build_model
    from megatron_slim.runtime.distributed import init_model_parallel
    from megatron_slim.runtime.layout import ParallelLayout

    cfg = load_model_config(mcore)
    tokenizer = text_tokenizer(Path(mcore) / TOKENIZER_DIR)
    out = {}
    for name, layout in LAYOUTS.items() if world > 1 else [("tp1", {})]:
        parallel = ParallelLayout(**layout)
        init_model_parallel(parallel, seed=100 + rank)
        model = build_model(cfg, parallel)
        load_model(model, mcore)
        lm = MegatronLM(model, tokenizer, context_length(cfg.hf_config, tokenizer), batch_size=3, micro_batch=2)
        with contextlib.redirect_stderr(io.StringIO()) as said:
            out[name] = run_requests(lm, args)
        out[name]["stderr"] = said.getvalue()
        if world > 1 and name == "tp2":
            out["tasks"], out["task_errors"] = score_tasks(model, cfg, Path(mcore) / TOKENIZER_DIR,
                                                           TaskSpec(tasks=TASKS, limit=LIMIT), batch_size=4,
                                                           micro_batch=2)
    return out


@pytest.fixture(scope="module")
def sweep(tiny) -> list[dict]:
    return run_distributed(layout_sweep, 2, str(tiny["mcore"]), requests(), timeout_s=300)


@pytest.fixture(scope="module")
def single(tiny) -> dict:
    return run_distributed(layout_sweep, 1, str(tiny["mcore"]), requests(), timeout_s=300)[0]


def test_requests_are_informative(hf_reference):
    ll = hf_reference["loglikelihood"]
    assert len({round(lp, 3) for lp, _ in ll}) == len(ll)  # distinct scores: a wrong alignment would show
    assert all(len(text) > 300 for (text,) in requests()["loglikelihood_rolling"])  # several rolling windows
    assert any(hf_reference["generate_until"])  # some generation is not cut at once


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_backend_matches_lm_eval_hf_backend(sweep, hf_reference, layout):
    for rank in sweep:  # every rank returns the answers
        got = rank[layout]
        assert [g for _, g in got["loglikelihood"]] == [g for _, g in hf_reference["loglikelihood"]], layout
        assert [lp for lp, _ in got["loglikelihood"]] == pytest.approx(
            [lp for lp, _ in hf_reference["loglikelihood"]], abs=1e-4, rel=1e-5), layout
        assert got["loglikelihood_rolling"] == pytest.approx(hf_reference["loglikelihood_rolling"], abs=1e-3,
                                                             rel=1e-5), layout
        assert got["generate_until"] == hf_reference["generate_until"], layout
    # the cache serves at TP1 (with DP, EP or PP); under TP2 rank 0 says once why generation re-forwards prefixes
    why = {"tp1": None, "ep2": None, "pp2": None, "tp2": "sequence parallelism"}[layout]
    said = [[line for line in rank[layout]["stderr"].splitlines() if "without a KV cache" in line] for rank in sweep]
    assert len(said[0]) == bool(why) and not said[1], said  # once, on rank 0 only
    assert all(f"without a KV cache because of {why}" in line for line in said[0]), said


def test_backend_alone_in_a_world_of_one_matches(single, hf_reference):
    assert [lp for lp, _ in single["tp1"]["loglikelihood"]] == pytest.approx(
        [lp for lp, _ in hf_reference["loglikelihood"]], abs=1e-4, rel=1e-5)
    assert single["tp1"]["generate_until"] == hf_reference["generate_until"]


def test_task_scores_match_lm_eval_hf_backend(sweep, hf_reference):
    for rank in sweep:
        assert set(rank["tasks"]) == set(TASKS)
        for task in TASKS:
            assert rank["tasks"][task] == pytest.approx(hf_reference["tasks"][task], rel=1e-4), task


def test_shipped_tasks_are_deterministic_and_well_formed():
    assert shipped_task_names() == sorted(TASKS)
    cloze, mc = wiki_docs.cloze_docs(), wiki_docs.continuation_docs()
    assert cloze == wiki_docs.cloze_docs() and len(cloze) > 500 and len(mc) > 500
    assert all(d["word"].isalpha() and not d["context"].endswith(" ") for d in cloze)
    assert all(len(d["choices"]) == wiki_docs.CHOICES and len(set(d["choices"])) == wiki_docs.CHOICES for d in mc)
    assert {d["label"] for d in mc} == set(range(wiki_docs.CHOICES))
    heldout = {d["text"] for d in wiki_docs.paragraph_docs()}
    assert all(any(d["context"] in p for p in heldout) for d in mc[:50])


def test_shipped_cloze_requests_put_the_space_in_the_continuation():
    """lm-eval adds no target delimiter to loglikelihood requests: without the space in the target, every word is
    scored glued to its context (a real model then scores ~0%; SmolLM2-135M gets ~68% with it)."""
    from lm_eval.tasks import TaskManager

    from megatron_slim.eval.harness import SHIPPED_TASKS

    tasks = TaskManager(include_path=[str(SHIPPED_TASKS)]).load(["wiki_cloze", "wiki_cloze_gen"])["tasks"]
    doc = wiki_docs.cloze_docs()[0]
    cloze, gen = (next(t for name, t in tasks.items() if str(name).endswith(n)) for n in ("wiki_cloze", "_gen"))
    cloze.build_all_requests(limit=1)
    gen.build_all_requests(limit=1)
    assert cloze.instances[0].args == (doc["context"], " " + doc["word"])
    assert gen.instances[0].args[0] == doc["context"] and gen.doc_to_target(doc) == doc["word"]


def test_unknown_or_unavailable_task_is_named(tmp_path):
    (tmp_path / "absent.yaml").write_text(
        "task: absent_hub_task\ndataset_path: megatron-slim-tests/no-such-dataset\noutput_type: loglikelihood\n"
        "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n")
    with pytest.raises(UserError) as caught:
        check_tasks(TaskSpec(tasks=("wiki_cloze", "no_such_task", "absent_hub_task"), include_path=(tmp_path,)))
    problems = str(caught.value).splitlines()[1:]  # one line per failing task; wiki_cloze loads
    assert len(problems) == 2, problems
    assert problems[0].strip().startswith("task no_such_task: unknown"), problems
    assert problems[1].strip().startswith("task absent_hub_task: its data could not be loaded"), problems
    assert "--include-path" in problems[1]
    with pytest.raises(UserError, match="--num-fewshot"):
        TaskSpec(tasks=("wiki_cloze",), num_fewshot=-1).validate()


def test_shipped_tasks_resolve_without_indexing_lm_evals_registry(tmp_path):
    """Tasks defined in the shipped or --include-path YAMLs come from an index of those files alone (the registry's
    ~14,000 YAMLs cost every evaluation ~14 CPU-seconds); a name that index lacks, and a group (its members may be
    registry tasks), need the whole registry, against which the test above resolves unknown names."""
    from megatron_slim.eval.harness import _task_index, _task_manager, needs_registry

    (tmp_path / "group.yaml").write_text("group: my_group\ntask: [wiki_cloze, lambada_openai]\n")
    manager = _task_manager(TaskSpec(tasks=("wiki_cloze", "wiki_continuation"), include_path=(tmp_path,)))
    assert manager is _task_index((tmp_path,), False) and "lambada_openai" not in manager.all_tasks
    assert "my_group" in manager.all_tasks
    assert set(manager.load(["wiki_cloze"])["tasks"]) == {"wiki_cloze"}
    assert not needs_registry(manager, ["wiki_continuation"])
    for names in (["wiki_cloze", "my_group"], ["lambada_openai"], ["no_such_task"]):
        assert needs_registry(manager, names), names


def test_table_has_a_row_per_task_metric():
    from megatron_slim.engines.evaluate_job import format_table

    text = format_table({"tasks": {"wiki_cloze": {"perplexity": 12.5, "acc": 0.25}, "wiki_perplexity": {}}})
    assert text.splitlines()[1:] == ["wiki_cloze       perplexity       12.5000",
                                     "wiki_cloze       acc              0.2500"]
    assert "loss" not in text


def test_checkpoint_without_tokenizer_is_refused(tiny, tmp_path):
    import shutil

    from megatron_slim.engines.evaluate_job import EvaluateJob, run_evaluate

    with pytest.raises(UserError, match="no tokenizer files"):
        text_tokenizer(None)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny["hf"] / name, bare / name)
    with pytest.raises(UserError, match="tokenizer"):
        run_evaluate(EvaluateJob(model=str(bare), tasks=("wiki_cloze",)))
    with pytest.raises(UserError, match="nothing to evaluate"):
        run_evaluate(EvaluateJob(model=str(tiny["hf"])))


def test_cli_scores_tasks_on_an_hf_checkpoint(tiny, hf_reference, tmp_path):
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "megatron_slim.cli", "evaluate", "--model", str(tiny["hf"]),
                           "--tasks", "wiki_cloze,wiki_cloze_gen", "--limit", str(LIMIT), "--json", "--out",
                           str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    assert "loss" not in printed and printed["layout"]["world"] == 1
    assert "without a KV cache" not in proc.stderr  # one rank, TP1: the cache serves
    for task in ("wiki_cloze", "wiki_cloze_gen"):  # one rank: generation's answers gathered over a world of 1
        assert printed["tasks"][task] == pytest.approx(hf_reference["tasks"][task], rel=1e-4)


def test_a_training_checkpoint_is_scored_like_its_source(tiny, hf_reference):
    """Every saved training step carries the student's tokenizer, so text tasks score it directly (a run evaluates
    its distilled iter_* directories). At learning rate 0 the step's weights are the source's: the same scores as
    lm-eval's HF backend on the source."""
    import yaml

    from support.toy_data import preprocess_args, write_toy_jsonl

    root = tiny["root"] / "train_lr0"
    root.mkdir()
    write_toy_jsonl(root / "data.jsonl", seed=0, docs=40)
    cfg = {"model": {"checkpoint": str(tiny["mcore"])}, "data": {"blend": [[1.0, str(root / "data")]],
                                                                  "seq_length": 32, "split": "90,10,0"},
           "batch": {"micro_batch_size": 2, "global_batch_size": 2}, "train": {"train_iters": 1},
           "optimizer": {"lr": 0.0, "min_lr": 0.0, "weight_decay": 0.0}, "loss": {"kd_weight": 0.0},
           "checkpoint": {"save_dir": str(root / "save")}}
    (root / "train.yaml").write_text(yaml.safe_dump(cfg))
    for argv in (preprocess_args(root, "data"), ["train", "--config", str(root / "train.yaml")],
                 ["evaluate", "--model", str(root / "save" / "iter_0000001"), "--tasks", "wiki_cloze",
                  "--limit", str(LIMIT), "--json"]):
        proc = subprocess.run([sys.executable, "-m", "megatron_slim.cli", *argv], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, (argv[0], proc.stderr[-3000:])
    assert (root / "save" / "iter_0000001" / "tokenizer" / "tokenizer.json").is_file()
    scores = json.loads(proc.stdout.strip().splitlines()[-1])["tasks"]["wiki_cloze"]
    assert scores == pytest.approx(hf_reference["tasks"]["wiki_cloze"], rel=1e-4)


def test_a_failing_task_keeps_the_other_tasks_scores(tiny, hf_reference, tmp_path):
    """One task failing while it is scored used to lose every task's scores (issue #28)."""
    import shutil

    from megatron_slim.eval.harness import SHIPPED_TASKS

    shutil.copy(SHIPPED_TASKS / "wiki_docs.py", tmp_path / "wiki_docs.py")
    (tmp_path / "broken.py").write_text("def results(doc, outputs):\n    raise RuntimeError('metric broke')\n")
    text = (SHIPPED_TASKS / "wiki_cloze.yaml").read_text().replace("task: wiki_cloze", "task: wiki_broken")
    (tmp_path / "wiki_broken.yaml").write_text(text + "process_results: !function broken.results\n")
    proc = subprocess.run([sys.executable, "-m", "megatron_slim.cli", "evaluate", "--model", str(tiny["hf"]),
                           "--tasks", "wiki_broken,wiki_cloze", "--include-path", str(tmp_path), "--limit",
                           str(LIMIT), "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    assert printed["tasks"]["wiki_cloze"] == pytest.approx(hf_reference["tasks"]["wiki_cloze"], rel=1e-4)
    assert "wiki_broken" not in printed["tasks"]
    assert printed["task_errors"]["wiki_broken"].endswith("RuntimeError: metric broke"), printed
    assert "warning: task wiki_broken failed, the other tasks' scores are kept" in proc.stderr
