"""Tiny assets for the launch.sh tests on the local SLURM cluster (tests/test_slurm_launch.py) and the recipe
runs of tests/test_run.py, built in one subprocess (`python tests/support/run_assets.py train|chain ROOT`) so that
the test process imports neither torch nor transformers and megatron-core is imported once.

train ROOT   the 2-layer Qwen3-MoE student checkpoint ROOT/student_mc and the indexed dataset ROOT/data of
             support/train_assets.py, and ROOT/plain.yaml, train_assets.write_config's run config over them
             without a teacher (see `run_config()`)
chain ROOT   for the two-stage recipe of `recipe()`: a random 8-layer Qwen3-Next teacher with one MTP depth
             (2 full-attention layers, so 4 kept layers keep the 1:3 hybrid ratio; EOS 127) and the indexed datasets
             ROOT/{train,calibration,heldout}; stage `depth` cuts 8 -> 4 layers, stage `width` the experts and
             hidden size, each with a few distillation steps
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

TESTS = Path(__file__).resolve().parents[1]
STAGES = ["depth", "width"]


def build(kind: str, root: Path, env: dict[str, str] | None = None, timeout: int = 900) -> None:
    """Build the `kind` assets under root in a subprocess."""
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), kind, str(root)], capture_output=True,
                         text=True, env=env, cwd=TESTS.parent, timeout=timeout)
    assert out.returncode == 0, f"building the {kind} assets failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"


def run_config(root: Path, name: str, train_iters: int) -> Path:
    """ROOT/<name>.yaml: the train assets' run config saving to ROOT/<name>, for train_iters steps."""
    cfg = yaml.safe_load((root / "plain.yaml").read_text())
    cfg["checkpoint"]["save_dir"] = str(root / name)
    cfg["train"]["train_iters"] = train_iters
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def recipe(root: Path, steps_per_stage: int = 3, **over) -> dict:
    """The two-stage recipe over the chain assets; 8 x 32 tokens per distillation step."""
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


# ---- run in the subprocess ------------------------------------------------------------------------------------
def _main(kind: str, root: Path) -> int:
    sys.path.insert(0, str(TESTS))
    from megatron_slim.cli import main
    from support import tiny_models
    from support.hf_checkpoints import build_tiny_hf, save_tiny_hf_with_mtp
    from support.toy_data import preprocess_args, write_toy_jsonl

    root.mkdir(parents=True, exist_ok=True)
    if kind == "train":
        build_tiny_hf(tiny_models.qwen3_moe(num_hidden_layers=2), 1).save_pretrained(root / "student_hf")
        write_toy_jsonl(root / "data.jsonl", seed=0, docs=400)
        commands = [["convert", "hf-to-mcore", "--hf", str(root / "student_hf"), "--out", str(root / "student_mc"),
                     "--no-progress"], preprocess_args(root, "data")]
        from support.train_assets import write_config

        write_config(root, "plain", teacher=False)
    elif kind == "chain":
        # eos_token_id: the toy data's document separator (the run's evaluation reads it from the config, as
        # the teacher has no tokenizer)
        teacher = tiny_models.qwen3_next(num_hidden_layers=8, eos_token_id=127,
                                         layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 2)
        save_tiny_hf_with_mtp(teacher, root / "teacher_hf", seed=0)
        commands = []
        for name, seed, docs in (("train", 0, 200), ("calibration", 1, 40), ("heldout", 2, 40)):
            write_toy_jsonl(root / f"{name}.jsonl", seed, docs)
            commands.append(preprocess_args(root, name))
    else:
        raise SystemExit(f"unknown assets {kind!r} (train or chain)")
    return max(main(argv) for argv in commands)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1], Path(sys.argv[2])))
