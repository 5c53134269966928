"""Training test assets made in the test process with the CLI: tiny teacher/student Megatron checkpoints, the toy
indexed dataset, run configs over them, and `cli` (megatron-slim in a subprocess, its stderr in the failure).

Import the fixture into a test module (`from support.train_assets import assets`); pytest registers imported
fixtures. Tests that must not import torch or transformers, or that need the recipe assets, use `support.run_assets`.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import PreTrainedModel

from support import tiny_models
from support.hf_checkpoints import build_tiny_hf
from support.toy_data import EOD_ID, preprocess_args, write_toy_jsonl

EOD = EOD_ID  # the toy language's document separator, the tiny models' eos_token_id


def cli(*args: str, check: bool = True, timeout: int = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "megatron_slim.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)
    if check and proc.returncode:
        raise AssertionError(f"megatron-slim {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def convert(model: PreTrainedModel, root: Path, name: str) -> Path:
    """Save an HF model as root/<name>_hf and convert it to the Megatron checkpoint root/<name>_mc."""
    model.save_pretrained(root / f"{name}_hf")
    cli("convert", "hf-to-mcore", "--hf", str(root / f"{name}_hf"), "--out", str(root / f"{name}_mc"),
        "--no-progress")
    return root / f"{name}_mc"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """teacher_mc (4 layers), student_mc (2 layers), both Qwen3-MoE with 8 experts top-2, and data.bin/.idx (from
    data.jsonl, which also serves as held-out data)."""
    root = tmp_path_factory.mktemp("train")
    convert(build_tiny_hf(tiny_models.qwen3_moe(eos_token_id=EOD), 0), root, "teacher")
    convert(build_tiny_hf(tiny_models.qwen3_moe(num_hidden_layers=2, eos_token_id=EOD), 1), root, "student")
    write_toy_data(root)
    return root


def write_toy_data(root: Path) -> None:
    """root/data.bin/.idx: 400 documents of the toy language (`support.toy_data`)."""
    write_toy_jsonl(root / "data.jsonl", seed=0, docs=400)
    cli(*preprocess_args(root, "data"))


def write_config(root: Path, name: str, teacher: bool = True, **sections) -> Path:
    """A run config over the assets (student_mc, teacher_mc unless teacher=False); sections override by key."""
    cfg = {
        "model": {"checkpoint": str(root / "student_mc")},
        "data": {"blend": [[1.0, str(root / "data")]], "seq_length": 32, "split": "90,10,0"},
        "parallel": {"tp": 1, "ep": 1},
        "batch": {"micro_batch_size": 2, "global_batch_size": 8},
        "train": {"train_iters": 6, "seed": 3},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4},
        "schedule": {"style": "cosine", "warmup_iters": 1},
        "loss": {"kd_weight": 0.5 if teacher else 0.0},
        "checkpoint": {"save_dir": str(root / name), "save_interval": 0, "keep_last": 2},
        "logging": {"log_interval": 1},
    }
    if teacher:
        cfg["teacher"] = {"checkpoint": str(root / "teacher_mc")}
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def metrics(root: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
