"""Bad inputs at the edges are clear one-line errors naming what is wrong and where, and nothing is used silently.

Each test here reproduces a defect found by trying the tools as a new user would (see tests/README.md for the full
table of bad inputs and faults and the tests that cover them).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_slim.data.calibration import calibration_windows
from megatron_slim.errors import UserError

EOS = 0


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("line, message", [
    ('{"tokens": [1, -3, 2]}', r"d\.jsonl:2: negative token id -3"),
    ('{"tokens": [1, 2.0, 2]}', r"d\.jsonl:2: 'tokens' must be a list of integer token ids"),
    ('{"tokens": [1, true]}', r"d\.jsonl:2: 'tokens' must be a list of integer token ids"),
    ('{"tokens": "1 2 3"}', r"d\.jsonl:2: 'tokens' must be a list of integer token ids"),
    ('{"tokens": [1, 50, 2]}', r"d\.jsonl:2: token id 50 is outside the model's vocabulary of 50"),
    ('{"tokens": [1, 2', r"d\.jsonl:2: not valid JSON"),
    ('[1, 2, 3]', r"d\.jsonl:2: expected a JSON object"),
    ('{"text": 5}', r"d\.jsonl:2: 'text' must be a string"),
])
def test_calibration_token_ids_are_checked_with_file_and_line(tmp_path, line, message):
    path = _jsonl(tmp_path / "d.jsonl", ['{"tokens": [4, 5, 6, 7]}', line])
    with pytest.raises(UserError, match=message):
        calibration_windows(path, 2, 4, EOS, vocab_size=50)


def test_calibration_ids_inside_the_vocabulary_pass_unchanged(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ['{"tokens": [4, 49, 6]}', '{"tokens": [0, 1, 2]}'])
    got = calibration_windows(path, 2, 3, EOS, vocab_size=50)
    assert torch.equal(got, torch.tensor([[4, 49], [6, 0], [0, 1]]))


def test_indexed_dataset_ids_outside_the_vocabulary_name_the_document(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "corpus")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for doc in ([1, 2, 3], [4, 60, 5]):
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(prefix + ".idx")
    with pytest.raises(UserError, match=r"corpus \(document 1\): token id 60 is outside .* vocabulary of 50"):
        calibration_windows(prefix, 2, 4, EOS, vocab_size=50)
    assert calibration_windows(prefix, 2, 4, EOS, vocab_size=61).shape == (4, 2)


def test_run_state_paths_survive_another_directory_and_a_moved_workdir(tmp_path, monkeypatch):
    """state.json stores work-dir paths relative to the work dir: a run resumed from another directory (or a
    moved work dir) finds its outputs; paths outside it stay absolute; numbers and structure are unchanged."""
    from megatron_slim.run.state import RunState

    (tmp_path / "launch").mkdir()
    (tmp_path / "data.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path / "launch")
    work = Path("runs/a")
    state = RunState(work, "digest")
    state.start("prepare/data")
    (work / "data").mkdir(parents=True)
    state.finish("prepare/data", {"train": [[1.0, str(work / "data" / "train")]], "heldout": "../data.jsonl",
                                  "steps": 3})
    stored = json.loads((work / "state.json").read_text())["steps"]["prepare/data"]["outputs"]
    assert stored == {"train": [[1.0, "data/train"]], "heldout": str(tmp_path / "data.jsonl"), "steps": 3}

    (tmp_path / "moved").mkdir()
    (tmp_path / "launch" / "runs" / "a").rename(tmp_path / "moved" / "a")
    monkeypatch.chdir(tmp_path / "moved")
    out = RunState(Path("a"), "digest").outputs("prepare/data")
    assert out == {"train": [[1.0, "a/data/train"]], "heldout": str(tmp_path / "data.jsonl"), "steps": 3}
    assert Path(out["train"][0][1]).parent.is_dir()


# ---- checkpoint files ----------------------------------------------------------------------------------------------
def _cli(*args: str) -> "subprocess.CompletedProcess[str]":
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "megatron_slim.cli", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    """A tiny sharded Qwen3-MoE HF checkpoint (index + 300 KB shards)."""
    from support import tiny_models
    from support.hf_checkpoints import build_tiny_hf

    out = tmp_path_factory.mktemp("bad") / "hf"
    build_tiny_hf(tiny_models.qwen3_moe(), 0).save_pretrained(out, max_shard_size="300KB")
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage, message", [
    ("config", r"config\.json: not valid JSON"),
    ("index", r"model\.safetensors\.index\.json: not valid JSON"),
    ("header", r"model-00001-of-\d+\.safetensors: corrupt safetensors header"),
    ("outside", r"shards must be files of the checkpoint directory itself, not \['\.\./outside\.safetensors'\]"),
])
def test_corrupt_checkpoint_files_are_named(tiny_hf, tmp_path, damage, message):
    hf = _copy(tiny_hf, tmp_path / "hf")
    if damage == "config":
        (hf / "config.json").write_text('{"architectures": ["Qwen3MoeForCausalLM"], ')
    elif damage == "index":
        (hf / "model.safetensors.index.json").write_text('{"weight_map": {')
    elif damage == "header":
        shard = sorted(hf.glob("model-00001-*.safetensors"))[0]
        raw = bytearray(shard.read_bytes())
        raw[8:12] = b"\xff{{{"
        shard.write_bytes(bytes(raw))
    else:
        index = json.loads((hf / "model.safetensors.index.json").read_text())
        key = next(iter(index["weight_map"]))
        (tmp_path / "outside.safetensors").write_bytes((hf / index["weight_map"][key]).read_bytes())
        index["weight_map"][key] = "../outside.safetensors"
        (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    proc = _cli("convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "mc"), "--no-progress")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("megatron-slim convert: error: ") and __import__("re").search(message, last), last
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mc").exists() and not (tmp_path / "mc.partial").exists()


# ---- plans ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planned(tiny_hf) -> tuple[Path, dict]:
    """A valid plan for `tiny_hf`: every layer, 8 experts -> 4 slots (two intact, two merged)."""
    from megatron_slim.compress.plan import CompressionPlan
    from megatron_slim.models.registry import model_config_from_hf

    source = model_config_from_hf(tiny_hf)
    slots = [[(0, 1.0)], [(1, 1.0)], [(2, 0.5), (3, 0.5)], [(4, 0.5), (5, 0.25), (6, 0.25)]]
    plan = CompressionPlan(source, source.replace(num_experts=4), list(range(source.num_layers)),
                           experts={f"layers.{i}": slots for i in range(source.num_layers)})
    return tiny_hf, plan.to_json()


def test_a_valid_plan_prunes(planned, tmp_path):
    hf, plan = planned
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    proc = _cli("prune", "--plan", str(tmp_path / "plan.json"), "--in", str(hf), "--out", str(tmp_path / "out"),
                "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from megatron_slim.models.registry import model_config_from_hf

    assert model_config_from_hf(tmp_path / "out").num_experts == 4


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.update(expert_weights=[]), r"unknown keys \['expert_weights'\]"),
    (lambda p: p.pop("layers"), r"missing keys \['layers'\]"),
    (lambda p: p["source"].update(hidden=3), r"source: unknown fields \['hidden'\]"),
    (lambda p: p["experts"].update({"layers.0": [[[0, float("nan")], [1, 1.0]]] + p["experts"]["layers.0"][1:]}),
     r"experts\['layers\.0'\]\[0\]: needs positive weights summing to 1, got \[nan, 1\.0\]"),
    (lambda p: p["experts"].update({"layers.0": [["a"]] + p["experts"]["layers.0"][1:]}),
     r"experts must map a layer to slots of \[expert, weight\] pairs"),
])
def test_bad_plans_are_refused_before_writing(planned, tmp_path, edit, message):
    hf, plan = planned
    plan = json.loads(json.dumps(plan))
    edit(plan)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    proc = _cli("prune", "--plan", str(tmp_path / "plan.json"), "--in", str(hf), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert __import__("re").search(message, proc.stderr), proc.stderr[-2000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_importance_refuses_ids_outside_the_vocabulary_before_any_compute(tiny_hf, tmp_path):
    """An id >= vocab used to be an IndexError traceback from inside the embedding."""
    data = _jsonl(tmp_path / "calib.jsonl", ['{"tokens": [1, 2, 3, 4]}', '{"tokens": [5, 128, 6]}'])
    proc = _cli("importance", "--model", str(tiny_hf), "--data", str(data), "--tokens", "8", "--seq-len", "4",
                "--out", str(tmp_path / "imp.safetensors"), "--no-progress")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (f"megatron-slim importance: error: {data}:2: token id 128 is "
                                                    "outside the model's vocabulary of 128")
    assert not (tmp_path / "imp.safetensors").exists() and not (tmp_path / "imp.safetensors.mcore-tmp").exists()


# ---- verify --------------------------------------------------------------------------------------------------------
def test_verify_fails_when_the_models_disagree(tiny_hf, tmp_path):
    """verify used to exit 0 at 0% top-1 agreement; now mismatched models fail (status 1), matching ones pass,
    and --min-top1 0 turns the check off."""
    from support import tiny_models
    from support.hf_checkpoints import build_tiny_hf

    other = tmp_path / "other_hf"
    build_tiny_hf(tiny_models.qwen3_moe(), 1).save_pretrained(other)  # same shapes, other weights
    mc = tmp_path / "mc"
    assert _cli("convert", "hf-to-mcore", "--hf", str(tiny_hf), "--out", str(mc), "--no-progress").returncode == 0
    same = _cli("verify", "--hf", str(tiny_hf), "--mcore", str(mc), "--seq-len", "16")
    assert same.returncode == 0 and "FAILED" not in same.stderr, same.stderr[-2000:]
    wrong = _cli("verify", "--hf", str(other), "--mcore", str(mc), "--seq-len", "16")
    assert wrong.returncode == 1, wrong.stderr[-2000:]
    assert "megatron-slim verify: parity FAILED: main: top-1 agreement" in wrong.stderr
    assert _cli("verify", "--hf", str(other), "--mcore", str(mc), "--seq-len", "16", "--min-top1", "0").returncode == 0


# ---- outputs -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["input", "parent", "unrelated"])
def test_convert_never_overwrites_its_input_or_a_foreign_directory(tiny_hf, tmp_path, where):
    """`--overwrite` used to delete the input (--out equal to --hf) or a whole parent directory, exit 0; now the
    conversion is refused before anything is touched, and only our own outputs are ever replaced."""
    hf = _copy(tiny_hf, tmp_path / "models" / "hf")
    (tmp_path / "models" / "notes.txt").write_text("keep me")
    out = {"input": hf, "parent": tmp_path / "models", "unrelated": tmp_path / "photos"}[where]
    if where == "unrelated":
        out.mkdir()
        (out / "cat.jpg").write_bytes(b"\xff\xd8")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    proc = _cli("convert", "hf-to-mcore", "--hf", str(hf), "--out", str(out), "--overwrite", "--no-progress")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "models" / "notes.txt").read_text() == "keep me"


def test_convert_overwrites_its_own_output(tiny_hf, tmp_path):
    out = tmp_path / "mc"
    for _ in range(2):
        proc = _cli("convert", "hf-to-mcore", "--hf", str(tiny_hf), "--out", str(out), "--overwrite", "--no-progress")
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "model_config.json").is_file() and not (tmp_path / "mc.partial").exists()
