"""Bad inputs at the edges are clear one-line errors naming what is wrong and where, and nothing is used silently.

Each test here reproduces a defect found by trying the tools as a new user would (see tests/README.md for the full
table of bad inputs and faults and the tests that cover them).
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_slim.data.calibration import calibration_windows
from megatron_slim.errors import UserError

EOS = 0


def _jsonl(path: Path, lines: list[str | bytes]) -> Path:
    """Lines given as bytes are written as they are (e.g. not UTF-8), the others UTF-8 encoded."""
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
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
    # issue #28: ids beyond int64 (JSON integers are unbounded), bytes that are not UTF-8
    ('{"tokens": [1, 18446744073709551616]}', r"d\.jsonl:2: token id 18446744073709551616 is outside the model's "
                                              r"vocabulary \(not even a 64-bit integer\)"),
    (b'{"text": "caf\xe9"}', r"d\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 14\)"),
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


def test_a_split_without_tokens_is_refused_instead_of_looping(tmp_path):
    """megatron-core counts epochs of an empty split forever: 40 documents at split 99,1,0 leave validation none."""
    from megatron_slim.train.data import TokenizerInfo, build_datasets, write_indexed_dataset

    prefix = tmp_path / "corpus"
    write_indexed_dataset(([1 + d % 7] * 20 for d in range(40)), prefix, vocab_size=50)
    tok = TokenizerInfo(vocab_size=50, eod=0)
    args = ([[1.0, str(prefix)]], 16, (8, 2, 0), 0, tok, str(tmp_path / "cache"), False)
    with pytest.raises(UserError, match=r"data.split '99,1,0' gives the validation split 0 of the 40 documents of "
                                        r".*corpus and no tokens, but the run needs 2 validation samples"):
        build_datasets(args[0], "99,1,0", *args[1:])
    train, valid, _ = build_datasets(args[0], "90,10,0", *args[1:])
    assert len(train) >= 8 and len(valid) >= 2


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
    assert last.startswith("megatron-slim convert: error: ") and re.search(message, last), last
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
    # the target is checked by the validator `plan` uses (issue #28: top-k 0 pruned into a non-functional MoE)
    (lambda p: p["target"].update(topk=0), r"target: topk=0 must be >= 1"),
    (lambda p: p["target"].update(mtp_num_layers=-1), r"target: mtp_layers=-1 must be >= 0"),
])
def test_bad_plans_are_refused_before_writing(planned, tmp_path, edit, message):
    hf, plan = planned
    plan = json.loads(json.dumps(plan))
    edit(plan)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    proc = _cli("prune", "--plan", str(tmp_path / "plan.json"), "--in", str(hf), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(message, proc.stderr), proc.stderr[-2000:]
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


# ---- configs that disagree with their weights ------------------------------------------------------------------
def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", 32, "lm_head.weight: the config implies (128, 32), the checkpoint holds (128, 64)"),
    ("num_attention_heads", 8,
     "model.layers.0.self_attn.o_proj.weight: the config implies (64, 128), the checkpoint holds (64, 64)"),
    ("head_dim", 8, "model.layers.0.self_attn.k_norm.weight: the config implies (8,), the checkpoint holds (16,)"),
])
def test_config_shapes_disagreeing_with_the_weights_name_the_tensor(tiny_hf, tmp_path, field, value, message):
    """Used to be `RuntimeError: shape '[2, 32, 32]' is invalid for input of size 4096` from inside a transform."""
    hf = _copy(tiny_hf, tmp_path / "hf")
    _edit_json(hf / "config.json", **{field: value})
    proc = _cli("convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "mc"), "--no-progress")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"megatron-slim convert: error: {hf}: config/weight shape mismatch: "), proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "mc").exists() and not (tmp_path / "mc.partial").exists()


def test_prune_names_config_weight_mismatches_of_either_format(planned, tmp_path):
    """prune (HF or Megatron input) and mcore-to-hf check the shapes before anything is written."""
    from megatron_slim.checkpoint.convert import hf_to_mcore, mcore_to_hf
    from megatron_slim.compress.plan import CompressionPlan
    from megatron_slim.compress.prune_checkpoint import prune_checkpoint
    from megatron_slim.errors import CheckpointError

    hf, plan = planned
    plan = CompressionPlan.from_json(plan)
    bad_hf = _copy(hf, tmp_path / "hf")
    _edit_json(bad_hf / "config.json", hidden_size=32)
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.weight: the config implies \(128, 32\), the "
                                              r"checkpoint holds \(128, 64\)"):
        prune_checkpoint(plan, bad_hf, tmp_path / "out", progress=False)
    mc = tmp_path / "mc"
    hf_to_mcore(hf, mc, progress=False)
    _edit_json(mc / "model_config.json", num_attention_heads=8)
    qkv = (r"decoder\.layers\.0\.self_attention\.linear_qkv\.weight: the config implies \(192, 64\), the checkpoint "
           r"holds \(128, 64\)")
    with pytest.raises(CheckpointError, match=qkv):
        prune_checkpoint(plan, mc, tmp_path / "out", progress=False)
    with pytest.raises(CheckpointError, match=qkv):
        mcore_to_hf(mc, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_model_type_must_agree_with_architectures():
    """A config whose `model_type` names another family used to be read as whatever `architectures` said."""
    from megatron_slim.models.config import UnsupportedModelError
    from megatron_slim.models.registry import model_config_from_hf
    from support import tiny_models

    with pytest.raises(UnsupportedModelError, match=r"architectures \['Qwen3MoeForCausalLM'\] is model_type "
                                                    r"'qwen3_moe', but model_type is 'mixtral'"):
        model_config_from_hf(tiny_models.qwen3_moe(model_type="mixtral"))
    assert model_config_from_hf(tiny_models.mixtral()).family == "mixtral"


# ---- non-finite weights --------------------------------------------------------------------------------------------
def _poison(hf: Path, key: str, values: dict[tuple[int, ...], float]) -> None:
    """Set entries of tensor `key` in its shard (other tensors untouched)."""
    from safetensors.torch import load_file, save_file

    shard = hf / json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"][key]
    tensors = load_file(shard)
    for at, v in values.items():
        tensors[key][at] = v
    save_file(tensors, shard, metadata={"format": "pt"})


@pytest.mark.parametrize("key, how", [
    ("model.layers.1.mlp.experts.3.down_proj.weight", "copied file to file"),
    ("model.layers.2.input_layernorm.weight", "read into memory"),
])
def test_nonfinite_weights_are_refused_at_conversion_both_ways(tiny_hf, tmp_path, key, how):
    """NaN/Inf weights used to convert (and calibrate: "LM loss nan") silently."""
    hf = _copy(tiny_hf, tmp_path / "hf")
    at = (0, 1) if "experts" in key else (1,)
    _poison(hf, key, {at: float("nan"), (2,) * len(at): float("inf")})
    mc = tmp_path / "mc"
    proc = _cli("convert", "hf-to-mcore", "--hf", str(hf), "--out", str(mc), "--no-progress")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"error: {hf}: {key} holds 1 NaN and 1 infinite values" in proc.stderr, proc.stderr[-2000:]
    assert not mc.exists() and not (tmp_path / "mc.partial").exists()

    proc = _cli("convert", "hf-to-mcore", "--hf", str(hf), "--out", str(mc), "--no-progress", "--allow-nonfinite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    mc_key = ("decoder.layers.3.mlp.experts.experts.linear_fc2.weight" if "experts" in key
              else "decoder.layers.4.self_attention.linear_qkv.layer_norm_weight")
    back = _cli("convert", "mcore-to-hf", "--mcore", str(mc), "--out", str(tmp_path / "back"), "--no-progress")
    assert back.returncode == 2 and f"error: {mc}: {mc_key} holds 1 NaN and 1 infinite values" in back.stderr, \
        back.stderr[-2000:]
    assert not (tmp_path / "back").exists()
    back = _cli("convert", "mcore-to-hf", "--mcore", str(mc), "--out", str(tmp_path / "back"), "--no-progress",
                "--allow-nonfinite")
    assert back.returncode == 0, back.stderr[-2000:]


def test_file_range_check_finds_a_nonfinite_value_in_any_chunk(tmp_path, monkeypatch):
    """Stored tensors are checked through one small buffer, chunk by chunk; the count covers the whole tensor."""
    from safetensors.torch import save_file

    from megatron_slim.checkpoint import finite
    from megatron_slim.checkpoint.safetensors_io import HFReader
    from megatron_slim.errors import CheckpointError

    monkeypatch.setattr(finite, "_CHUNK_BYTES", 64)  # 16 float32 per chunk
    t = torch.randn(10, 10)
    t[9, 9], t[0, 3] = float("-inf"), float("nan")
    save_file({"w": t, "ok": torch.randn(10, 10), "ids": torch.arange(10)}, tmp_path / "model.safetensors")
    info = HFReader(tmp_path).tensors
    check = finite.FileRangeCheck()
    for name in ("ok", "ids"):
        check.check("m", name, info[name].file, info[name].start, info[name].nbytes, info[name].dtype)
    with pytest.raises(CheckpointError, match=r"m: w holds 1 NaN and 1 infinite values \(of 100\)"):
        check.check("m", "w", info["w"].file, info["w"].start, info["w"].nbytes, info["w"].dtype)
    t[0, 3] = 0.0
    save_file({"w": t}, tmp_path / "model.safetensors")
    info = HFReader(tmp_path).tensors["w"]
    with pytest.raises(CheckpointError, match=r"w holds 0 NaN and 1 infinite values"):  # in the last chunk only
        check.check("m", "w", info.file, info.start, info.nbytes, info.dtype)
    # copying while checking (mcore-to-hf's pieces the kernel would copy misaligned): the bytes land exactly, and
    # a piece holding a bad value is refused with the count over the whole tensor it belongs to
    piece = (info.file, info.start + 40 * 4, 60 * 4, info.dtype)  # rows 4-9: the Inf at [9, 9]
    with open(tmp_path / "out", "wb") as out, pytest.raises(CheckpointError, match=r"w holds 0 NaN and 1 infinite "
                                                                                      r"values \(of 100\)"):
        check.copy("m", "w", *piece, out, whole=(info.start, info.nbytes))
    t[9, 9] = 1.0
    save_file({"w": t}, tmp_path / "model.safetensors")
    info = HFReader(tmp_path).tensors["w"]
    with open(tmp_path / "out", "wb") as out:
        out.write(b"head")
        check.copy("m", "w", info.file, info.start + 40 * 4, 60 * 4, info.dtype, out)
    assert (tmp_path / "out").read_bytes() == b"head" + t[4:].numpy().tobytes()


def test_check_pool_hands_a_nonfinite_range_to_the_converter(tmp_path, monkeypatch):
    """mcore-to-hf checks (and copies) stored tensors on threads of their own: a bad tensor still fails the
    conversion, named, from `finish` (which waits for every range) or from the next `submit`, the earliest submitted
    if several are bad, and the threads end either way."""
    import threading

    from safetensors.torch import load_file, save_file

    from megatron_slim.checkpoint import finite
    from megatron_slim.checkpoint.finite import CheckPool
    from megatron_slim.checkpoint.safetensors_io import HFReader
    from megatron_slim.errors import CheckpointError

    monkeypatch.setattr(finite, "_CHUNK_BYTES", 4096)  # several chunks per tensor
    bad = torch.randn(300, 100).to(torch.bfloat16)
    bad[299, 99] = float("inf")  # in the last bytes checked
    save_file({"ok": torch.randn(300, 100), "w": bad, "ids": torch.arange(10)}, tmp_path / "model.safetensors")
    info = HFReader(tmp_path).tensors
    args = {k: (info[k].file, info[k].start, info[k].nbytes, info[k].dtype) for k in info}
    with CheckPool() as checks:
        checks.submit("m", "ok", *args["ok"])
        checks.submit("m", "ids", *args["ids"])
        checks.finish()
        checks.submit("m", "w", *args["w"])
        with pytest.raises(CheckpointError, match=r"m: w holds 0 NaN and 1 infinite values \(of 30000\)"):
            checks.finish()
        with pytest.raises(CheckpointError, match=r"m: w holds"):
            checks.submit("m", "ok", *args["ok"])
    # two bad tensors on two threads: the small one, submitted second, fails first; the earlier one is named
    big = torch.randn(8 << 20).to(torch.bfloat16)
    big[-1] = float("nan")
    (tmp_path / "two").mkdir()
    save_file({"big": big, "w": bad}, tmp_path / "two" / "model.safetensors")
    two = HFReader(tmp_path / "two").tensors
    with CheckPool(threads=2) as checks:
        for k in ("big", "w"):
            checks.submit("m", k, two[k].file, two[k].start, two[k].nbytes, two[k].dtype)
        with pytest.raises(CheckpointError, match=r"m: big holds 1 NaN and 0 infinite values"):
            checks.finish()
    with CheckPool(lag=1) as checks:  # a lag of one byte: each submit waits for the previous range's check
        checks.submit("m", "w", *args["w"])
        with pytest.raises(CheckpointError, match=r"m: w holds"):
            checks.submit("m", "ok", *args["ok"])
    # copying as it checks (`into`: a file and an offset), beside the file's other writer, in several jobs which
    # both threads take: the bytes land exactly
    monkeypatch.setattr(finite, "_JOB_BYTES", 16384)
    out = tmp_path / "out"
    out.write_bytes(b"head")
    with CheckPool() as checks:
        checks.submit("m", "ids", *args["ids"], into=(out, 4 + args["ok"][2]))
        checks.submit("m", "ok", *args["ok"], into=(out, 4))
        checks.finish()
        (tmp_path / "out2").touch()
        checks.submit("m", "w", *args["w"], into=(tmp_path / "out2", 0))
        with pytest.raises(CheckpointError, match=r"m: w holds 0 NaN and 1 infinite values"):
            checks.finish()
    saved = load_file(tmp_path / "model.safetensors")
    assert out.read_bytes() == b"head" + saved["ok"].numpy().tobytes() + saved["ids"].numpy().tobytes()
    assert not [t for t in threading.enumerate() if t.name == "nonfinite-check"]


def _with_eos(mcore: Path) -> Path:
    """The tiny models have no tokenizer: their config names the document separator instead."""
    config = json.loads((mcore / "model_config.json").read_text())
    config["hf_config"]["eos_token_id"] = 0
    (mcore / "model_config.json").write_text(json.dumps(config))
    return mcore


def test_importance_refuses_nonfinite_weights_before_collecting(tiny_hf, tmp_path):
    """A Megatron checkpoint holding NaN (converted with --allow-nonfinite) used to calibrate to "LM loss nan"; an
    HF one is refused by the conversion importance runs first."""
    hf = _copy(tiny_hf, tmp_path / "hf")
    _poison(hf, "model.layers.2.input_layernorm.weight", {(1,): float("nan"), (2,): float("inf")})
    mc = tmp_path / "mc"
    assert _cli("convert", "hf-to-mcore", "--hf", str(hf), "--out", str(mc), "--no-progress",
                "--allow-nonfinite").returncode == 0
    _with_eos(mc)
    data = _jsonl(tmp_path / "calib.jsonl", ['{"tokens": [1, 2, 3, 4, 5, 6, 7, 8, 9]}'])
    for model, name in ((mc, r"decoder\.layers\.4\.\S*norm\S*"), (hf, r"model\.layers\.2\.input_layernorm\.weight")):
        out = tmp_path / "imp.safetensors"
        proc = _cli("importance", "--model", str(model), "--data", str(data), "--tokens", "8", "--seq-len", "4",
                    "--out", str(out), "--no-progress")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert re.search(rf"error: {re.escape(str(model))}: {name} holds 1 NaN and 1 infinite values",
                         proc.stderr.strip().splitlines()[-1]), proc.stderr[-2000:]
        assert "LM loss" not in proc.stdout and not out.exists()


# ---- plan fingerprints ---------------------------------------------------------------------------------------------
def test_fingerprint_is_format_independent_and_sees_weights(tiny_hf, tmp_path):
    """Same for an HF checkpoint and its Megatron conversion; another seed, one norm gain of the last layer or one
    weight of the first layer's attention changes it."""
    from megatron_slim.checkpoint.convert import hf_to_mcore
    from megatron_slim.checkpoint.fingerprint import model_fingerprint
    from support import tiny_models
    from support.hf_checkpoints import build_tiny_hf

    base = model_fingerprint(tiny_hf)
    hf_to_mcore(tiny_hf, tmp_path / "mc", progress=False)
    assert model_fingerprint(tmp_path / "mc") == base
    build_tiny_hf(tiny_models.qwen3_moe(), 1).save_pretrained(tmp_path / "seed1")
    assert model_fingerprint(tmp_path / "seed1") != base
    for key, at in (("model.layers.3.post_attention_layernorm.weight", (5,)),
                    ("model.layers.0.self_attn.q_proj.weight", (7, 9))):
        edited = _copy(tiny_hf, tmp_path / key)
        _poison(edited, key, {at: 0.125})
        assert model_fingerprint(edited) != base, key


def test_prune_refuses_a_plan_computed_on_another_model(tiny_hf, tmp_path):
    """`prune` used to apply a plan computed on a different model of the same shapes without a word."""
    from support import tiny_models
    from support.hf_checkpoints import build_tiny_hf

    other = tmp_path / "other"
    build_tiny_hf(tiny_models.qwen3_moe(), 1).save_pretrained(other)
    data = _jsonl(tmp_path / "calib.jsonl", ['{"tokens": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]}'])
    imp, plan = tmp_path / "imp.safetensors", tmp_path / "plan.json"
    proc = _cli("importance", "--model", str(tiny_hf), "--data", str(data), "--tokens", "16", "--seq-len", "4",
                "--out", str(imp), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _cli("plan", "--importance", str(imp), "--out", str(plan), "--num-experts", "4").returncode == 0
    fingerprint = json.loads(plan.read_text())["source_fingerprint"]
    assert fingerprint.startswith("v2:")

    refused = _cli("prune", "--plan", str(plan), "--in", str(other), "--out", str(tmp_path / "s1"), "--no-progress")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert (f"the plan was computed on another model than {other}: same config, other weights (fingerprint "
            f"{fingerprint}") in refused.stderr
    assert not (tmp_path / "s1").exists()
    assert _cli("prune", "--plan", str(plan), "--in", str(other), "--out", str(tmp_path / "s1"), "--no-progress",
                "--allow-other-model").returncode == 0
    same = _cli("prune", "--plan", str(plan), "--in", str(tiny_hf), "--out", str(tmp_path / "s0"), "--no-progress")
    assert same.returncode == 0 and "warning" not in same.stderr, same.stderr[-2000:]

    old = json.loads(plan.read_text())
    del old["source_fingerprint"]  # a plan written before plans carried one
    plan.write_text(json.dumps(old))
    legacy = _cli("prune", "--plan", str(plan), "--in", str(other), "--out", str(tmp_path / "s2"), "--no-progress")
    assert legacy.returncode == 0, legacy.stderr[-2000:]
    assert "warning: the plan carries no fingerprint of the model it was computed on" in legacy.stderr


# ---- a killed converter --------------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_a_killed_convert_leaves_no_layout_child_or_temporary_directory(tiny_hf, tmp_path, sig):
    """The layout child used to outlive a killed `convert` and leave /tmp/megatron-slim-layout-* behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "megatron_slim.cli", "convert", "hf-to-mcore", "--hf",
                             str(tiny_hf), "--out", str(tmp_path / "mc"), "--no-progress"],
                            env=os.environ | {"TMPDIR": str(tmp)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline, child = time.monotonic() + 60, None
    while child is None and time.monotonic() < deadline and proc.poll() is None:
        child = next((c for c in _children(proc.pid) if b"megatron_slim.checkpoint.layout" in
                      Path(f"/proc/{c}/cmdline").read_bytes()), None)
        time.sleep(0.01)
    assert child is not None, "the layout child was not seen"
    assert list(tmp.glob("megatron-slim-layout-*"))
    os.kill(proc.pid, getattr(signal, sig))
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while (_alive(child) or list(tmp.glob("megatron-slim-layout-*"))) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the layout child outlived its parent"
    assert not list(tmp.glob("megatron-slim-layout-*"))


# ---- YAML files ----------------------------------------------------------------------------------------------------
def test_yaml_syntax_errors_name_file_and_line(tmp_path):
    """Run configs, recipes and targets with a YAML syntax error used to raise PyYAML's multi-line error (a
    traceback for run configs) instead of one line naming the file and line."""
    from megatron_slim.compress.target import TargetSpec
    from megatron_slim.run.recipe_check import load_recipe
    from megatron_slim.train.config import load_run_config

    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  checkpoint: a\n  teacher: [b, c\nparallel:\n  tp: 1\n")
    for load in (load_run_config, load_recipe, TargetSpec.from_yaml):
        with pytest.raises(UserError, match=rf"^{broken}:4:\d+: not valid YAML: "):
            load(broken)
    proc = _cli("train", "--config", str(broken))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"megatron-slim train: error: {broken}:4:")


# ---- single-file outputs -------------------------------------------------------------------------------------------
def _without_root_override(*args: str) -> "subprocess.CompletedProcess[str]":
    """The CLI without the capability that lets root write into read-only directories (as any other user)."""
    import shutil
    import subprocess
    import sys

    caps = "-dac_override,-dac_read_search"
    prefix = ["setpriv", "--bounding-set", caps, "--inh-caps", caps] if shutil.which("setpriv") else []
    return subprocess.run([*prefix, sys.executable, "-m", "megatron_slim.cli", *args], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_mcore(tiny_hf, tmp_path_factory) -> Path:
    from megatron_slim.checkpoint.convert import hf_to_mcore

    out = tmp_path_factory.mktemp("bad_mc") / "mc"
    hf_to_mcore(tiny_hf, out, progress=False)
    return _with_eos(out)


def test_single_file_outputs_are_claimed_before_any_compute(tiny_mcore, tmp_path):
    """A read-only output directory used to fail importance and plan only after all their compute (a
    PermissionError traceback); evaluate replaced an existing --out without being asked."""
    data = _jsonl(tmp_path / "calib.jsonl", ['{"tokens": [1, 2, 3, 4, 5, 6, 7, 8, 9]}'])
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        proc = _without_root_override("importance", "--model", str(tiny_mcore), "--data", str(data), "--tokens",
                                      "8", "--seq-len", "4", "--out", str(ro / "imp.safetensors"), "--no-progress")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert f"cannot use {ro / 'imp.safetensors.lock'} as the lock of {ro / 'imp.safetensors'} (Permission " \
               "denied)" in proc.stderr
        assert "LM loss" not in proc.stdout
        imp = tmp_path / "imp.safetensors"
        assert _cli("importance", "--model", str(tiny_mcore), "--data", str(data), "--tokens", "8", "--seq-len", "4",
                    "--out", str(imp), "--no-progress").returncode == 0
        proc = _without_root_override("plan", "--importance", str(imp), "--out", str(ro / "plan.json"),
                                      "--num-experts", "4")
        assert proc.returncode == 2 and "Permission denied" in proc.stderr and "Traceback" not in proc.stderr, \
            proc.stderr[-2000:]
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)

    result = tmp_path / "eval.json"
    result.write_text("earlier result\n")
    proc = _cli("evaluate", "--model", str(tiny_mcore), "--data", str(data), "--tokens", "8", "--seq-len", "4",
                "--mtp-k", "0", "--out", str(result))
    assert proc.returncode == 2 and f"{result} exists (use --overwrite to replace it)" in proc.stderr
    assert result.read_text() == "earlier result\n" and "loss" not in proc.stdout
    proc = _cli("evaluate", "--model", str(tiny_mcore), "--data", str(data), "--tokens", "8", "--seq-len", "4",
                "--mtp-k", "0", "--out", str(result), "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(result.read_text())["model"] == str(tiny_mcore)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".eval", "eval"))) == ["eval.json"]


def test_checkpoint_output_that_is_a_file_is_refused_with_overwrite(tiny_hf, tmp_path):
    """`--out` naming a file, with --overwrite: one clear line, the file untouched, no `*.partial` left."""
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    proc = _cli("convert", "hf-to-mcore", "--hf", str(tiny_hf), "--out", str(out), "--overwrite", "--no-progress")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"megatron-slim convert: error: output {out} exists and is not " \
                                                   "a directory"
    assert out.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# ---- reads stay inside the input (issue #28) -----------------------------------------------------------------------
def test_dcp_storage_entries_outside_the_checkpoint_are_refused(tiny_hf, tmp_path):
    """A `.metadata` built from the admitted record classes only, whose storage entry for the embedding names
    `../other/__0_0.distcp`, used to make `mcore-to-hf` and `prune` copy another checkpoint's tensor (and the
    fingerprint, which skipped embeddings, matched)."""
    import dataclasses
    import pickle

    from megatron_slim.checkpoint.convert import hf_to_mcore
    from megatron_slim.checkpoint.fingerprint import model_fingerprint
    from megatron_slim.checkpoint.safe_metadata import load_metadata
    from support import tiny_models
    from support.hf_checkpoints import build_tiny_hf

    mc, other = tmp_path / "mc", tmp_path / "other"
    hf_to_mcore(tiny_hf, mc, progress=False)
    build_tiny_hf(tiny_models.qwen3_moe(), 1).save_pretrained(tmp_path / "hf1")
    hf_to_mcore(tmp_path / "hf1", other, progress=False)
    before = model_fingerprint(mc)
    md, theirs = load_metadata(mc / ".metadata"), load_metadata(other / ".metadata")
    key = "embedding.word_embeddings.weight"
    index = next(i for i in md.storage_data if i.fqn == key)
    md.storage_data[index] = dataclasses.replace(theirs.storage_data[index], relative_path="../other/__0_0.distcp")
    (mc / ".metadata").write_bytes(pickle.dumps(md))
    message = (f"the storage entry of {key} names the file '../other/__0_0.distcp', which lies outside the checkpoint "
               f"directory {mc}; refusing to read it")
    proc = _cli("convert", "mcore-to-hf", "--mcore", str(mc), "--out", str(tmp_path / "hf"), "--no-progress")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert message in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert not (tmp_path / "hf").exists()
    from megatron_slim.errors import CheckpointError

    with pytest.raises(CheckpointError, match=re.escape(message)):
        model_fingerprint(mc)

    # the same swap through a file inside the directory: the fingerprint sees the embedding now
    (mc / "__1_0.distcp").write_bytes((other / "__0_0.distcp").read_bytes())
    md.storage_data[index] = dataclasses.replace(theirs.storage_data[index], relative_path="__1_0.distcp")
    (mc / ".metadata").write_bytes(pickle.dumps(md))
    assert model_fingerprint(mc) != before


# ---- no broken model behind success (issue #28) --------------------------------------------------------------------
def _one_json(stdout: str) -> dict:
    """stdout holds exactly one JSON document, strictly parsed (no NaN/Infinity)."""
    def strict(token: str) -> None:
        raise AssertionError(f"not JSON: {token}")

    return json.loads(stdout, parse_constant=strict)


def test_nonfinite_weights_are_not_evaluated_and_json_stays_json(tiny_hf, tmp_path):
    """`evaluate --json` on NaN weights printed `"loss": NaN` (not JSON) with status 0."""
    hf = _copy(tiny_hf, tmp_path / "hf")
    _poison(hf, "model.layers.2.input_layernorm.weight", {(1,): float("nan")})
    mc = tmp_path / "mc"
    assert _cli("convert", "hf-to-mcore", "--hf", str(hf), "--out", str(mc), "--no-progress",
                "--allow-nonfinite").returncode == 0
    _with_eos(mc)
    data = _jsonl(tmp_path / "d.jsonl", ['{"tokens": [1, 2, 3, 4, 5, 6, 7, 8, 9]}'])
    args = ["evaluate", "--model", str(mc), "--data", str(data), "--tokens", "8", "--seq-len", "4", "--mtp-k", "0",
            "--json"]
    proc = _cli(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    doc = _one_json(proc.stdout)
    assert re.search(r"decoder\.layers\.4\.\S*norm\S* holds 1 NaN and 0 infinite values.*--allow-nonfinite",
                     doc["error"]) and doc["exit_status"] == 2, doc
    proc = _cli(*args, "--allow-nonfinite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = _one_json(proc.stdout)
    assert doc["loss"] is None and "/loss" in doc["nonfinite"], doc


def test_json_modes_print_one_document_on_failure(tmp_path):
    """A failing `--json` command printed nothing on stdout (or a traceback): now one {"error": ...} document."""
    proc = _cli("plan", "--config", str(tmp_path / "missing"), "--num-experts", "2", "--json")
    assert proc.returncode == 2
    doc = _one_json(proc.stdout)
    assert doc["command"] == "plan" and "missing" in doc["error"], doc


def test_json_out_writes_nonfinite_numbers_as_null_with_their_paths():
    from megatron_slim.runtime.json_out import dumps

    text = dumps({"loss": float("nan"), "tasks": {"a": {"acc": 0.5, "ppl": float("inf")}}, "xs": [1.0, -float("inf")]})
    assert _one_json(text) == {"loss": None, "tasks": {"a": {"acc": 0.5, "ppl": None}}, "xs": [1.0, None],
                               "nonfinite": ["/loss", "/tasks/a/ppl", "/xs/1"]}


def _hub_snapshot(hf: Path, repo: Path) -> Path:
    """`hf` laid out as a Hugging Face hub cache stores it: snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    import hashlib
    import os

    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for f in sorted(hf.iterdir()):
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        (repo / "blobs" / blob).write_bytes(f.read_bytes())
        os.symlink(f"../../blobs/{blob}", snap / f.name)
    return snap


def test_a_hub_cache_snapshot_reads_as_a_normal_checkpoint(tiny_hf, tmp_path):
    """A sharded snapshot (every file a link into ../../blobs/) was refused as "shards must be files of the
    checkpoint directory itself"."""
    hf = _copy(tiny_hf, tmp_path / "hf")
    (hf / "chat_template.jinja").write_text("{{ messages }}")
    snap = _hub_snapshot(hf, tmp_path / "hub" / "models--org--tiny")
    assert len(list(snap.glob("model-*.safetensors"))) > 1
    proc = _cli("convert", "hf-to-mcore", "--hf", str(snap), "--out", str(tmp_path / "mc"), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    copied = tmp_path / "mc" / "tokenizer" / "chat_template.jinja"
    assert not copied.is_symlink() and copied.read_text() == "{{ messages }}"


@pytest.mark.parametrize("name", ["chat_template.jinja", "model-00002-of-00004.safetensors"])
def test_a_link_leaving_the_input_is_refused_unless_followed(tiny_hf, tmp_path, name):
    """A tokenizer/chat-template file linking to a file elsewhere was copied into the conversion as a regular
    file without a word (and a shard linking elsewhere was read)."""
    import os

    hf = _copy(tiny_hf, tmp_path / "hf")
    target = tmp_path / "elsewhere" / name
    target.parent.mkdir()
    if name.endswith(".safetensors"):
        name = sorted(p.name for p in hf.glob("model-*.safetensors"))[1]
        os.replace(hf / name, target)
    else:
        target.write_text("secret")
    os.symlink(target, hf / name)
    proc = _cli("convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "mc"), "--no-progress")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"megatron-slim convert: error: {hf / name} links to {target}, outside the input {hf}; refusing to read it "
        "(--follow-symlinks follows links that leave the input)")
    assert not (tmp_path / "mc").exists()
    proc = _cli("convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "mc"), "--no-progress",
                "--follow-symlinks")
    assert proc.returncode == 0, proc.stderr[-2000:]


# ---- weak cases of issue #28: one line naming the file, key or value -----------------------------------------------
@pytest.mark.parametrize("content, message", [
    ('{"recipe": "d", "steps": {"a": {"status": "do', r"state\.json: not valid JSON"),
    ('[1, 2]', r"state\.json: not a run state \(expected an object with a 'steps' object"),
    ('{"recipe": "d", "steps": {"a": 3}}', r"state\.json: not a run state"),
])
def test_a_damaged_run_state_is_named(tmp_path, content, message):
    from megatron_slim.run.state import STATE, RunState

    (tmp_path / STATE).write_text(content)
    for open_state in (lambda: RunState(tmp_path, "d"), lambda: RunState.read(tmp_path)):
        with pytest.raises(UserError, match=message + r".*remove .*state\.json"):
            open_state()


@pytest.mark.parametrize("content", ["garbage\n", "", "12abc", "\xff\xfe"])
def test_a_garbage_latest_file_is_named(tmp_path, content):
    from megatron_slim.train.checkpointing import latest_step

    (tmp_path / "latest").write_bytes(content.encode("latin-1"))
    with pytest.raises(UserError, match=rf"{re.escape(str(tmp_path / 'latest'))}: expected the number of the latest "
                                        "saved step"):
        latest_step(tmp_path)


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    """1.1 KB of nested aliases took 2.6 GB in the dry run."""
    import resource

    from megatron_slim.runtime.config_loader import load_yaml

    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}]" for i in range(1, 10)]
    bomb = tmp_path / "recipe.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert bomb.stat().st_size < 1200
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(UserError, match=r"recipe\.yaml: YAML aliases expand to more than 100000 values"):
        load_yaml(bomb)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB
    fine = tmp_path / "fine.yaml"
    fine.write_text("base: &b {lr: 1.0e-4, wd: 0.1}\nstage1: *b\nstage2: *b\n")
    assert load_yaml(fine)["stage2"] == {"lr": 1.0e-4, "wd": 0.1}


def test_nonfinite_recipe_and_config_values_are_named(tmp_path):
    """YAML's .nan/.inf were taken as a learning rate or a token budget."""
    from megatron_slim.run.recipe_parse import parse_study
    from megatron_slim.run.recipe_schema import RecipeError
    from megatron_slim.runtime.config_loader import load_yaml
    from megatron_slim.train.config import load_run_config

    config = tmp_path / "run.yaml"
    config.write_text("optimizer: {lr: .nan, min_lr: .inf}\n")
    with pytest.raises(UserError, match=r"run\.yaml\.optimizer\.lr: must be a finite number, got nan; .*"
                                        r"run\.yaml\.optimizer\.min_lr: must be a finite number, got inf"):
        load_run_config(config)
    raw = load_yaml(Path(__file__).resolve().parents[1] / "megatron_slim" / "demo" / "recipe.yaml")
    raw["train_tokens"] = float("inf")
    with pytest.raises(RecipeError, match=r"needs train_tokens \(total distillation tokens\), got inf"):
        parse_study(raw, tmp_path)


# ---- no orphans (issue #28) ----------------------------------------------------------------------------------------
def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in _children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def _none_alive(pids: list[int], seconds: float = 20) -> list[int]:
    import time

    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _spawned_world(tmp_path: Path):
    import os
    import subprocess
    import sys
    import time

    tests = Path(__file__).resolve().parent
    code = ("import sys; from megatron_slim.runtime.spawn import run_local_world; "
            "from support.lifetime_workers import preemptible; "
            f"sys.exit(run_local_world(preemptible, 2, {str(tmp_path)!r}))")
    proc = subprocess.Popen([sys.executable, "-c", code], env=os.environ | {"PYTHONPATH": os.pathsep.join(
        [str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")])}, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300  # spawned ranks import torch: seconds, more on a loaded machine
    while len(list(tmp_path.glob("rank*.pids"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    time.sleep(0.2)  # the pid files are written before the ranks' loops start
    return proc, [int(p) for f in tmp_path.glob("rank*.pids") for p in f.read_text().split()]


def test_sigterm_reaches_spawned_ranks_which_checkpoint_and_requeue(tmp_path):
    """`run` with `nproc: 2` exited at once on SIGTERM while its orphaned ranks finished the run."""
    import signal

    proc, pids = _spawned_world(tmp_path)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode == 75, proc.stderr.read()
    assert sorted(p.name for p in tmp_path.glob("*.checkpoint")) == ["rank0.checkpoint", "rank1.checkpoint"]
    assert _none_alive(pids) == []


def test_a_killed_launcher_leaves_no_rank_or_forked_helper(tmp_path):
    """kill -9 of the process that spawned the ranks: ranks and the processes they forked die with it."""
    import signal

    proc, pids = _spawned_world(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert _none_alive(pids) == [], "survivors after the launcher was killed"
    assert not list(tmp_path.glob("*.checkpoint"))


def test_a_child_command_dies_with_the_process_that_started_it(tiny_hf, tmp_path):
    """A `megatron-slim` command started as a child (a multi-rank run's single-process step, the conversion before
    ranks spawn: `lifetime.child_env`) dies with its parent, even one killed before the child asked for it; it used
    to run on to its end, writing its output for nobody."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "mc"
    code = ("import os, subprocess, sys; from megatron_slim.runtime.lifetime import child_env; "
            "child = subprocess.Popen([sys.executable, '-m', 'megatron_slim.cli', 'convert', 'hf-to-mcore', '--hf', "
            f"{str(tiny_hf)!r}, '--out', {str(out)!r}, '--no-progress'], env=child_env(dict(os.environ))); "
            "print(child.pid, flush=True); child.wait()")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)  # at once: the child has not even parsed its arguments yet
    parent.wait()
    assert _none_alive([child], 120) == [], "the child command outlived its parent"
    assert not out.exists()


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_a_killed_importance_leaves_no_rank_computing(tiny_mcore, tmp_path, sig):
    """`importance --ep 2` ranks re-parented to PID 1 and kept computing into a hidden `.partial` after their
    parent was killed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data = _jsonl(tmp_path / "d.jsonl", ['{"tokens": [1, 2, 3, 4, 5, 6, 7, 8, 9]}'] * 64)
    out = tmp_path / "imp.safetensors"
    proc = subprocess.Popen([sys.executable, "-m", "megatron_slim.cli", "importance", "--model", str(tiny_mcore),
                             "--data", str(data), "--tokens", "256", "--seq-len", "4", "--ep", "2", "--out", str(out),
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, ranks = time.monotonic() + 120, []
    while len(ranks) < 2 and time.monotonic() < deadline and proc.poll() is None:
        ranks = [c for c in _descendants(proc.pid) if b"multiprocessing" in Path(f"/proc/{c}/cmdline").read_bytes()
                 and b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        time.sleep(0.05)
    assert len(ranks) == 2, "the two ranks were not seen"
    time.sleep(1.0)  # the ranks are importing / loading
    everyone = _descendants(proc.pid)
    os.kill(proc.pid, getattr(signal, sig))
    proc.wait(timeout=120)
    assert _none_alive(everyone, 60) == [], f"survivors after {sig}"
    assert not out.exists()


def test_a_missing_tokenizer_directory_is_named_as_such(tmp_path):
    """transformers took the path for a hub repo id: "Repo id must be in the form 'repo_name'..."."""
    from megatron_slim.data.calibration import load_tokenizer

    with pytest.raises(UserError, match=rf"^tokenizer directory {re.escape(str(tmp_path / 'nope'))} does not exist$"):
        load_tokenizer(tmp_path / "nope")


def test_verify_refuses_a_layout_that_does_not_fit_before_starting_ranks(tiny_mcore, tiny_hf, tmp_path):
    """`verify --tp 3` died in three tracebacks from inside megatron-core."""
    proc = _cli("verify", "--hf", str(tiny_hf), "--mcore", str(tiny_mcore), "--tp", "3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.fullmatch(r"megatron-slim verify: error: --tp 3 --ep 1 --pp 1: parallel layout does not fit the model: "
                        r"num_attention_heads=\d+ is not divisible by tp=3.*", proc.stderr.strip()), proc.stderr


def test_upcycle_refuses_a_model_that_needs_remote_code(tmp_path):
    """An unknown model_type with auto_map showed transformers' interactive trust-remote-code prompt."""
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"model_type": "evil_arch", "architectures": ["EvilForCausalLM"],
                                                   "auto_map": {"AutoModelForCausalLM": "modeling_evil.Evil"}}))
    (dense / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    proc = _cli("upcycle", "--dense", str(dense), "--out", str(tmp_path / "moe"), "--experts", "2", "--topk", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"megatron-slim upcycle: error: {dense / 'config.json'}: model_type 'evil_arch' is not a model transformers "
        "knows (its auto_map names code stored in the checkpoint, which megatron-slim never runs); upcycle needs a "
        "dense decoder transformers implements (e.g. llama)")


@pytest.mark.parametrize("argv, message", [
    (["upcycle", "--dense", "{missing}", "--experts", "4", "--topk", "5", "--out", "{out}"],
     "--topk must be between 1 and --experts (4), got 5"),
    (["upcycle", "--dense", "{missing}", "--experts", "0", "--topk", "1", "--out", "{out}"],
     "--experts must be >= 1, got 0"),
    (["upcycle", "--dense", "{missing}", "--experts", "2", "--topk", "1", "--out", "{out}", "--calib-tokens", "0"],
     "--calib-tokens must be >= 1, got 0"),
    (["preprocess", "--input", "{missing}", "--output-prefix", "{out}", "--tokenizer", "none"],
     "--tokenizer none needs --vocab-size"),
    (["importance", "--model", "{missing}", "--data", "{missing}", "--tokens", "64", "--seq-len", "16",
      "--max-tokens", "8", "--out", "{out}"], "--max-tokens 8 is below one step of 1 sequences of 16 tokens"),
])
def test_jobs_refuse_their_settings_before_reading_any_input(tmp_path, capsys, argv, message):
    """A job's own validate() refuses what its worker would refuse of its settings, before any input is read (the
    inputs here do not exist: the settings are named first), as a recipe's dry run refuses its sections."""
    from megatron_slim.cli import main

    argv = [a.format(missing=tmp_path / "missing", out=tmp_path / "out") for a in argv]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"megatron-slim {argv[0]}: error: {message}"
    assert not (tmp_path / "out").exists()


def test_heldout_data_that_is_training_data_warns(tmp_path):
    from megatron_slim.run.recipe_check import heldout_overlap_warning
    from megatron_slim.run.recipe_parse import parse_study
    from megatron_slim.runtime.config_loader import load_yaml

    raw = load_yaml(Path(__file__).resolve().parents[1] / "megatron_slim" / "demo" / "recipe.yaml")
    (tmp_path / "train.jsonl").write_text("{}\n")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "train.jsonl")
    raw["data"]["heldout"] = "link.jsonl"  # the same file under another name
    recipe = next(iter(parse_study(raw, tmp_path).recipes.values()))
    assert heldout_overlap_warning(recipe) == (
        f"warning: data.heldout {recipe.data.heldout} is also training data (data.train {recipe.data.train}): "
        "held-out loss will measure memorisation, not generalisation")
    raw["data"]["heldout"] = "heldout.jsonl"
    assert heldout_overlap_warning(next(iter(parse_study(raw, tmp_path).recipes.values()))) is None


def test_permission_errors_are_one_line_naming_the_path(tiny_hf, tmp_path):
    """A path this user cannot read or write ended in a PermissionError traceback."""
    import shutil

    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(tiny_hf / "config.json", hf / "config.json")
    (hf / "config.json").chmod(0o000)
    try:
        proc = _without_root_override("plan", "--config", str(hf), "--num-experts", "4", "--json")
    finally:
        (hf / "config.json").chmod(0o644)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip() == (f"megatron-slim plan: error: {hf / 'config.json'}: Permission denied (a directory "
                                   "this user cannot write to, or a file it cannot read)")
    assert json.loads(proc.stdout)["error"].endswith("Permission denied (a directory this user cannot write to, or a "
                                                     "file it cannot read)")
