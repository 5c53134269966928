"""Training test assets: tiny teacher/student Megatron checkpoints and an indexed dataset, made with the CLI.

Import the fixture into a test module (`from train_fixtures import assets`); pytest registers imported fixtures.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import PreTrainedModel

import tiny_models
from hf_fixtures import build_tiny_hf

EOD = 127  # the toy language's document separator, the tiny models' eos_token_id


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
    """root/data.bin/.idx: a learnable toy language (arithmetic progressions) over the tiny models' vocabulary."""
    rng = random.Random(0)
    with open(root / "data.jsonl", "w") as f:
        for _ in range(400):
            start, step = rng.randrange(120), rng.choice([1, 2, 3])
            f.write(json.dumps({"tokens": [(start + step * i) % 120 for i in range(rng.randrange(20, 60))]}) + "\n")
    cli("preprocess", "--input", str(root / "data.jsonl"), "--output-prefix", str(root / "data"), "--tokenizer",
        "none", "--json-key", "tokens", "--vocab-size", "128", "--eod-id", str(EOD))


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
