"""A tiny two-stage recipe for `launch.sh --submit --chain` on the local SLURM cluster (tests/test_slurm_launch.py).

The teacher is a random 8-layer Qwen3-Next with one MTP depth (2 full-attention layers, so 4 kept layers keep the
1:3 hybrid ratio); the data are three indexed datasets of the toy arithmetic-progression language of
tests/train_fixtures.py. Stage `depth` cuts 8 -> 4 layers, stage `width` the experts and hidden size, each with a
few distillation steps.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import yaml

import tiny_models
from hf_fixtures import save_tiny_hf_with_mtp

TEACHER = tiny_models.qwen3_next(num_hidden_layers=8, layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 2)
STAGES = ["depth", "width"]

# Several megatron-slim commands in one process: each start imports torch and megatron-core.
_MANY = "import json, sys\nfrom megatron_slim.cli import main\nsys.exit(max(main(a) for a in json.loads(sys.argv[1])))"


def run_commands(commands: list[list[str]], env: dict[str, str] | None = None, timeout: int = 600) -> None:
    """Run `megatron-slim <args>` for each args list, in order, in one Python process."""
    out = subprocess.run([sys.executable, "-c", _MANY, json.dumps(commands)], capture_output=True, text=True,
                         env=env, cwd=Path(__file__).resolve().parents[1], timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]


def write_toy_jsonl(path: Path, seed: int, docs: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:  # a learnable toy language: arithmetic progressions
        for _ in range(docs):
            start, step = rng.randrange(120), rng.choice([1, 2, 3])
            f.write(json.dumps({"tokens": [(start + step * i) % 120 for i in range(rng.randrange(20, 60))]}) + "\n")


def preprocess_args(root: Path, name: str) -> list[str]:
    return ["preprocess", "--input", str(root / f"{name}.jsonl"), "--output-prefix", str(root / name), "--tokenizer",
            "none", "--json-key", "tokens", "--vocab-size", "128", "--eod-id", "127"]


def build_assets(root: Path, env: dict[str, str] | None = None) -> None:
    """root/teacher_hf and the indexed datasets root/{train,calibration,heldout}."""
    save_tiny_hf_with_mtp(TEACHER, root / "teacher_hf", seed=0)
    for name, seed, docs in (("train", 0, 200), ("calibration", 1, 40), ("heldout", 2, 40)):
        write_toy_jsonl(root / f"{name}.jsonl", seed, docs)
    run_commands([preprocess_args(root, name) for name in ("train", "calibration", "heldout")], env=env)


def recipe(root: Path, steps_per_stage: int = 3, **over) -> dict:
    """The two-stage recipe over build_assets' files; 8 x 32 tokens per distillation step."""
    data = {
        "name": "tiny-chain",
        "teacher": str(root / "teacher_hf"),
        "data": {"train": [[1.0, str(root / "train")]], "calibration": str(root / "calibration"),
                 "heldout": str(root / "heldout"), "seq_length": 32},
        "parallel": {"tp": 1, "pp": 1, "ep": 1},
        "nproc": 1,
        "importance": {"tokens": 256},
        "evaluation": {"tokens": 256, "mtp_k": 2},
        "training": {"batch": {"micro_batch_size": 4, "global_batch_size": 8},
                     "optimizer": {"lr": 3e-3, "min_lr": 3e-4}, "schedule": {"style": "cosine", "warmup_iters": 1},
                     "loss": {"kd_weight": 0.5}, "train": {"seed": 5},
                     "checkpoint": {"save_interval": 0, "keep_last": 1}, "logging": {"log_interval": 1}},
        "target": {"num_layers": 4, "num_experts": 4, "topk": 2, "hidden_size": 48, "moe_ffn_hidden_size": 16},
        "preset": "depth_first",
        "train_tokens": steps_per_stage * 8 * 32 * len(STAGES),
    }
    data.update(over)
    return data


def write_recipe(root: Path, name: str, content: dict) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(content))
    return path
