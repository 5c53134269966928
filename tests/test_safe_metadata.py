"""No code runs from a Megatron checkpoint's files (issue #17): torch's DCP reader would `pickle.load` the
`.metadata` and `torch.load(weights_only=False)` every sharded object; megatron_slim.checkpoint.safe_metadata
reads both through restricted unpicklers on every load path, and genuine checkpoints load unchanged.

| bad input / fault                                                  | test                                      |
|--------------------------------------------------------------------|-------------------------------------------|
| crafted `.metadata` (os.system / builtins.exec) read by McoreReader | test_mcore_reader_refuses_crafted_metadata |
| ... on `convert mcore-to-hf` (CLI, exit 2, one line)                | test_mcore_to_hf_refuses_crafted_metadata  |
| ... on load_model (evaluate, importance, verify, train init), and a | test_load_model_refuses_crafted_files_and_ |
|     crafted `common_state` sharded object in the .distcp           |   loads_genuine_ones_unchanged            |
| ... on training resume (`train` with `latest`)                      | test_resume_refuses_crafted_metadata_then_ |
|                                                                    |   resumes_from_the_genuine_one            |
| a new load path that bypasses the checks                           | test_every_checkpoint_read_goes_through_   |
|                                                                    |   the_checks                              |
"""
from __future__ import annotations

import ast
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import MetadataIndex

from megatron_slim.checkpoint.mcore_reader import McoreReader
from megatron_slim.checkpoint.safe_metadata import load_metadata
from megatron_slim.errors import CheckpointError
from support import tiny_models
from support.dist import run_distributed
from support.hf_checkpoints import build_tiny_hf
from support.train_assets import cli, convert, write_config, write_toy_data
from support.workers import save_reference

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_slim"


class SystemPayload:
    """Unpickled, runs `touch <path>` through os.system: the file existing afterwards means code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch '{self.path}'",)


class ExecPayload(SystemPayload):
    """Unpickled, creates <path> through builtins.exec."""

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').close()",)


def plant_metadata(ckpt: Path, payload: SystemPayload) -> None:
    """Put `payload` into the checkpoint's real metadata (as its planner_data) and write it back."""
    path = ckpt / ".metadata"
    metadata = pickle.loads(path.read_bytes())  # written by this test's fixtures: trusted
    metadata.planner_data = payload
    path.write_bytes(pickle.dumps(metadata))


def plant_object(ckpt: Path, key: str, payload: SystemPayload) -> None:
    """Replace the sharded object `key` by torch.save([payload]), appended to its .distcp file (metadata
    re-pointed at it): what DCP's default planner would torch.load with weights_only=False."""
    path = ckpt / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    index = MetadataIndex(key)
    info = metadata.storage_data[index]
    data = ckpt / info.relative_path
    offset = data.stat().st_size
    with open(data, "ab") as f:
        torch.save([payload], f)
    metadata.storage_data[index] = _StorageInfo(info.relative_path, offset, data.stat().st_size - offset,
                                                info.transform_descriptors)
    path.write_bytes(pickle.dumps(metadata))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    """conv_mc (written by our converter), core_mc (by megatron-core's dist_checkpointing.save), run/iter_0000001
    (a training checkpoint of conv_mc, with optimizer, RNG and common state), data for training."""
    root = tmp_path_factory.mktemp("safe_metadata")
    model = build_tiny_hf(tiny_models.qwen3_moe(num_hidden_layers=2), 1)
    shutil.move(convert(model, root, "student"), root / "conv_mc")
    tokens = torch.randint(0, tiny_models.VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    run_distributed(save_reference, 1, "qwen3_moe", str(root / "core_mc"), tokens)
    write_toy_data(root)
    cfg = write_config(root, "run", teacher=False, model={"checkpoint": str(root / "conv_mc")},
                       train={"train_iters": 2, "exit_interval": 1})
    cli("train", "--config", str(cfg))
    assert (root / "run" / "latest").read_text().strip() == "1"
    return root


def copy(ckpts: Path, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ckpts / name, tmp_path / Path(name).name))


def test_payloads_run_code_when_unpickled_plainly(ckpts, tmp_path):
    """The control: what the checks refuse below really runs code under pickle.load / torch.load."""
    for i, kind in enumerate((SystemPayload, ExecPayload)):
        ckpt = copy(ckpts, "core_mc", tmp_path / f"m{i}")
        plant_metadata(ckpt, kind(tmp_path / f"ran{i}"))
        pickle.loads((ckpt / ".metadata").read_bytes())
        assert (tmp_path / f"ran{i}").exists()
    ckpt = copy(ckpts, "core_mc", tmp_path / "obj")
    plant_object(ckpt, "common_state/shard_0_1", SystemPayload(tmp_path / "ran_obj"))
    info = pickle.loads((ckpt / ".metadata").read_bytes()).storage_data[MetadataIndex("common_state/shard_0_1")]
    with open(ckpt / info.relative_path, "rb") as f:
        f.seek(info.offset)
        torch.load(f, weights_only=False)
    assert (tmp_path / "ran_obj").exists()


@pytest.mark.parametrize("name", ["conv_mc", "core_mc", "run/iter_0000001"])
def test_genuine_metadata_reads_as_pickle_reads_it(ckpts, name):
    path = ckpts / name / ".metadata"
    assert vars(load_metadata(path)) == vars(pickle.loads(path.read_bytes()))


@pytest.mark.parametrize("payload, refused", [(SystemPayload, "posix.system"), (ExecPayload, "builtins.exec")])
def test_mcore_reader_refuses_crafted_metadata(ckpts, tmp_path, payload, refused):
    ckpt = copy(ckpts, "conv_mc", tmp_path)
    plant_metadata(ckpt, payload(tmp_path / "ran"))
    with pytest.raises(CheckpointError) as e:
        McoreReader(ckpt)
    assert str(ckpt / ".metadata") in str(e.value) and f"'{refused}'" in str(e.value)
    assert not (tmp_path / "ran").exists()


def test_mcore_to_hf_refuses_crafted_metadata(ckpts, tmp_path):
    ckpt = copy(ckpts, "conv_mc", tmp_path)
    plant_metadata(ckpt, SystemPayload(tmp_path / "ran"))
    proc = cli("convert", "mcore-to-hf", "--mcore", str(ckpt), "--out", str(tmp_path / "hf"), "--no-progress",
               check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "error:" in last and str(ckpt / ".metadata") in last and "'posix.system'" in last, proc.stderr[-3000:]
    assert not (tmp_path / "ran").exists()


def load_cases(rank: int, world: int, cases: dict[str, str]) -> dict[str, str | bool]:
    """Per case, load_model_config + load_model (the project's path); "error: ..." on failure, else whether every
    tensor equals megatron-core's own unchecked dist_checkpointing.load of the same checkpoint."""
    from megatron.core import dist_checkpointing

    from megatron_slim.checkpoint.mcore import load_model, load_model_config
    from megatron_slim.models.builder import build_model
    from megatron_slim.runtime.distributed import init_model_parallel
    from megatron_slim.runtime.layout import ParallelLayout

    init_model_parallel(ParallelLayout(), seed=5)
    out: dict[str, str | bool] = {}
    for name, ckpt in cases.items():
        cfg = load_model_config(ckpt)
        model = build_model(cfg, ParallelLayout())
        try:
            load_model(model, ckpt)
        except CheckpointError as e:
            out[name] = f"error: {e}"
            continue
        reference = build_model(cfg, ParallelLayout())
        sharded = reference.sharded_state_dict()
        state = dist_checkpointing.load(sharded, ckpt)
        reference.load_state_dict({k: v for k, v in state.items() if k in sharded}, strict=True)
        got, want = model.state_dict(), reference.state_dict()
        out[name] = sorted(got) == sorted(want) and all(
            torch.equal(got[k], want[k]) for k in got if isinstance(got[k], torch.Tensor))
    return out


def test_load_model_refuses_crafted_files_and_loads_genuine_ones_unchanged(ckpts, tmp_path):
    crafted = {"conv_metadata": copy(ckpts, "conv_mc", tmp_path / "a"),
               "core_metadata": copy(ckpts, "core_mc", tmp_path / "b"),
               "core_common_state": copy(ckpts, "core_mc", tmp_path / "c")}
    plant_metadata(crafted["conv_metadata"], SystemPayload(tmp_path / "ran_a"))
    plant_metadata(crafted["core_metadata"], ExecPayload(tmp_path / "ran_b"))
    plant_object(crafted["core_common_state"], "common_state/shard_0_1", SystemPayload(tmp_path / "ran_c"))
    cases = {"conv": str(ckpts / "conv_mc"), "core": str(ckpts / "core_mc"),
             "training": str(ckpts / "run" / "iter_0000001"), **{k: str(v) for k, v in crafted.items()}}
    got = run_distributed(load_cases, 1, cases, timeout_s=300)[0]
    assert got["conv"] is True and got["core"] is True and got["training"] is True, got
    assert str(crafted["conv_metadata"] / ".metadata") in got["conv_metadata"], got
    assert "'posix.system'" in got["conv_metadata"], got
    assert str(crafted["core_metadata"] / ".metadata") in got["core_metadata"], got
    assert "'builtins.exec'" in got["core_metadata"], got
    assert "common_state/shard_0_1" in got["core_common_state"] and "posix.system" in got["core_common_state"], got
    assert not any((tmp_path / f"ran_{c}").exists() for c in "abc")


def test_resume_refuses_crafted_metadata_then_resumes_from_the_genuine_one(ckpts, tmp_path):
    save_dir = Path(shutil.copytree(ckpts / "run", tmp_path / "resumed", ignore=shutil.ignore_patterns("data_cache")))
    step_dir = save_dir / "iter_0000001"
    genuine = (step_dir / ".metadata").read_bytes()
    plant_metadata(step_dir, SystemPayload(tmp_path / "ran"))
    cfg = write_config(ckpts, "resumed", teacher=False, model={"checkpoint": str(ckpts / "conv_mc")},
                       train={"train_iters": 2}, checkpoint={"save_dir": str(save_dir)})
    proc = cli("train", "--config", str(cfg), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert str(step_dir / ".metadata") in last and "'posix.system'" in last, proc.stderr[-3000:]
    assert not (tmp_path / "ran").exists()
    (step_dir / ".metadata").write_bytes(genuine)
    proc = cli("train", "--config", str(cfg))
    assert "resumed from" in proc.stdout and "at step 1" in proc.stdout


def _bypasses(tree: ast.AST) -> list[str]:
    """Calls that would read checkpoint pickles without the checks."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == "FileSystemReader":
            found.append(f"line {node.lineno}: FileSystemReader (use safe_metadata.SafeFileSystemReader)")
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        name = f"{owner}.{node.func.attr}"
        if name in ("dist_checkpointing.load", "pickle.load", "pickle.loads") or node.func.attr in (
                "load_common_state_dict", "load_sharded_metadata", "load_tensors_metadata", "load_plain_tensors",
                "load_content_metadata"):
            found.append(f"line {node.lineno}: {name} (use safe_metadata.load)")
        if name == "torch.load" and not any(k.arg == "weights_only" and getattr(k.value, "value", None) is True
                                            for k in node.keywords):
            found.append(f"line {node.lineno}: torch.load without weights_only=True")
    return found


def test_every_checkpoint_read_goes_through_the_checks():
    bypasses = {str(p.relative_to(PACKAGE)): b for p in sorted(PACKAGE.rglob("*.py"))
                if p.name != "safe_metadata.py" and (b := _bypasses(ast.parse(p.read_text())))}
    assert not bypasses, bypasses
