"""Step time of online distillation (student + frozen teacher forward) versus training the student alone.

Builds a random Qwen3-MoE-shaped pair from configs (default teacher 8 layers / hidden 256 / 16 experts, student
4 layers / hidden 192 / 8 experts, the shape a pruning plan gives), saves both as HF checkpoints and converts them
with `megatron-slim convert hf-to-mcore`, writes random token documents as an indexed dataset, then runs the real
`Trainer` (setup, then `train_step` only: no checkpoint saves) for two run configs that differ only in
    student alone:     no teacher, loss.kd_weight 0
    student + teacher: the teacher,  loss.kd_weight 0.5
each in fresh spawned ranks (--nproc, world size 1 by default). Reported: the median step time over --steps steps
after --warmup steps, their ratio, and the FLOP-ideal ratio

    ideal = (6*S + 2*T) / (6*S)

S, T: active parameters per token of student and teacher from `compress.accounting.account`, without the
embedding row but with the output head (so its matmul counts): a training step costs ~6 FLOPs per active
parameter per token (forward 2, backward 4), the frozen teacher's forward ~2. Ignored: attention's quadratic
(scores, softmax) terms, the KD/LM loss over the vocabulary, the optimizer step, and MoE dispatch. Overhead
= measured / ideal - 1: what the teacher costs beyond its matmuls (dispatch, kernel launches, KD loss).

Device: the Trainer uses CUDA when it is available (pass --bf16 there), else CPU with gloo and megatron_slim's
cpu_compat; the script is the same. On CPU the tiny default shapes make fixed per-layer costs (routing, dispatch,
Python) a large share, so the overhead is an upper bound of what larger models see.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_distill_step.py
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_distill_step.py --steps 20 --seq-length 512 --vocab 32768
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml


def qwen3_moe_config(args: argparse.Namespace, layers: int, hidden: int, experts: int, moe_ffn: int) -> dict:
    return dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=args.vocab,
                hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
                hidden_act="silu", max_position_embeddings=max(4096, args.seq_length), rms_norm_eps=1e-6,
                tie_word_embeddings=False, rope_parameters={"rope_theta": 1e6, "rope_type": "default"},
                attention_bias=False, use_sliding_window=False, decoder_sparse_step=1,
                moe_intermediate_size=moe_ffn, num_experts_per_tok=args.topk, num_experts=experts,
                norm_topk_prob=True, router_aux_loss_coef=0.0, mlp_only_layers=[], initializer_range=0.02,
                eos_token_id=args.vocab - 1)


def make_checkpoint(hf_config: dict, seed: int, root: Path, name: str) -> Path:
    """Random HF model saved as root/<name>_hf, converted to the Megatron checkpoint root/<name>_mc."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(hf_config["model_type"], **{k: v for k, v in hf_config.items() if k != "model_type"})
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / f"{name}_hf")
    out = root / f"{name}_mc"
    proc = subprocess.run([sys.executable, "-m", "megatron_slim.cli", "convert", "hf-to-mcore", "--hf",
                           str(root / f"{name}_hf"), "--out", str(out), "--no-progress"],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"convert {name} failed:\n{proc.stderr[-3000:]}")
    return out


def make_data(root: Path, vocab: int, tokens: int, seed: int) -> Path:
    """Uniformly random token documents (lengths 64..1024), each ended by the EOD id vocab-1."""
    from megatron_slim.train.data import write_indexed_dataset

    rng = np.random.default_rng(seed)

    def docs():
        left = tokens
        while left > 0:
            n = int(rng.integers(64, 1025))
            left -= n + 1
            yield rng.integers(0, vocab - 1, n).tolist() + [vocab - 1]

    write_indexed_dataset(docs(), root / "data", vocab)
    return root / "data"


def run_config(args: argparse.Namespace, root: Path, name: str, teacher: Path | None) -> Path:
    cfg = {
        "model": {"checkpoint": str(root / "student_mc")},
        "data": {"blend": [[1.0, str(root / "data")]], "seq_length": args.seq_length, "split": "98,2,0"},
        "parallel": {"tp": args.tp, "ep": args.ep},
        "batch": {"micro_batch_size": args.micro_batch, "global_batch_size": args.global_batch},
        "train": {"train_iters": args.warmup + args.steps, "seed": 1},
        "schedule": {"style": "constant"},
        "precision": {"bf16": args.bf16},
        "loss": {"kd_weight": 0.5 if teacher else 0.0, "kd_kind": args.kd_kind},
        "checkpoint": {"save_dir": str(root / name)},
    }
    if teacher is not None:
        cfg["teacher"] = {"checkpoint": str(teacher)}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_steps(config_path: str, out_path: str, warmup: int, steps: int) -> None:
    """One rank: Trainer.setup, then warmup + steps train_steps, each timed to completion; rank 0 writes them."""
    import torch.distributed as dist

    from megatron_slim.train.config import load_run_config
    from megatron_slim.train.trainer import Trainer

    trainer = Trainer(load_run_config(config_path))
    trainer.setup()
    times, cpu_times, records = [], [], []
    for _ in range(warmup + steps):
        _sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        records.append(trainer.train_step())
        _sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    if dist.get_rank() == 0:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        Path(out_path).write_text(json.dumps({"times": times[warmup:], "cpu_times": cpu_times[warmup:],
                                              "device": device, "threads": torch.get_num_threads(),
                                              "last": records[-1]}))


def measure(config: Path, nproc: int, warmup: int, steps: int) -> dict:
    from megatron_slim.runtime.spawn import run_local_world

    out = config.with_suffix(".times.json")
    run_local_world(timed_steps, nproc, str(config), str(out), warmup, steps)
    return json.loads(out.read_text())


def pooled(runs: list[dict]) -> dict:
    return {**runs[-1], "times": [t for r in runs for t in r["times"]],
            "cpu_times": [t for r in runs for t in r["cpu_times"]]}


def active_per_token(ckpt: Path) -> int:
    """Active parameters a token's matmuls use: accounting's active count minus the embedding row."""
    from megatron_slim.checkpoint.mcore import load_model_config
    from megatron_slim.compress.accounting import account

    acc = account(load_model_config(ckpt))
    return acc.active - acc.components["embeddings"].active


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher-layers", type=int, default=8)
    p.add_argument("--teacher-hidden", type=int, default=256)
    p.add_argument("--teacher-experts", type=int, default=16)
    p.add_argument("--teacher-moe-ffn", type=int, default=128)
    p.add_argument("--student-layers", type=int, default=4)
    p.add_argument("--student-hidden", type=int, default=192)
    p.add_argument("--student-experts", type=int, default=8)
    p.add_argument("--student-moe-ffn", type=int, default=96)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, caches)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per run; the median is reported")
    p.add_argument("--rounds", type=int, default=2, help="alternating runs of each config, steps pooled")
    p.add_argument("--kd-kind", default="fkl", choices=["fkl", "rkl", "jsd"])
    p.add_argument("--bf16", action="store_true", help="bf16 params and compute (use on GPU)")
    p.add_argument("--nproc", type=int, default=1, help="spawned ranks (data parallel unless --tp/--ep)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--workdir", default=None, help="keep checkpoints and data here (default: a temp dir)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_distill_") as tmp:
        root = Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        teacher = make_checkpoint(qwen3_moe_config(args, args.teacher_layers, args.teacher_hidden,
                                                   args.teacher_experts, args.teacher_moe_ffn), 0, root, "teacher")
        make_checkpoint(qwen3_moe_config(args, args.student_layers, args.student_hidden, args.student_experts,
                                         args.student_moe_ffn), 1, root, "student")
        tokens_needed = (args.warmup + args.steps) * args.global_batch * (args.seq_length + 1)
        make_data(root, args.vocab, 2 * tokens_needed + 100_000, 0)
        print(f"prepared checkpoints and data in {time.perf_counter() - t0:.1f} s ({root})")

        s, t = active_per_token(root / "student_mc"), active_per_token(teacher)
        ideal = (6 * s + 2 * t) / (6 * s)
        configs = run_config(args, root, "student_alone", None), run_config(args, root, "with_teacher", teacher)
        rounds: list[tuple[dict, dict]] = []
        for _ in range(args.rounds):  # alternate, so slow drifts in machine load hit both alike
            rounds.append(tuple(measure(c, args.nproc, args.warmup, args.steps) for c in configs))
        alone, paired = pooled([r[0] for r in rounds]), pooled([r[1] for r in rounds])

    tokens = args.global_batch * args.seq_length
    print(f"device {alone['device']}, {alone['threads']} thread(s)/rank, {args.nproc} rank(s), "
          f"{'bf16' if args.bf16 else 'fp32'}; {tokens} tokens/step (seq {args.seq_length} x global batch "
          f"{args.global_batch}, micro {args.micro_batch}); vocab {args.vocab}; median of {args.rounds} x {args.steps} "
          f"steps, each run after {args.warmup} warm-up")
    print(f"student: {args.student_layers} layers, hidden {args.student_hidden}, {args.student_experts} experts "
          f"top-{args.topk}, moe ffn {args.student_moe_ffn}: S = {s / 1e6:.3f}M active params/token")
    print(f"teacher: {args.teacher_layers} layers, hidden {args.teacher_hidden}, {args.teacher_experts} experts "
          f"top-{args.topk}, moe ffn {args.teacher_moe_ffn}: T = {t / 1e6:.3f}M active params/token")
    print("(S, T: accounting.account active minus the embedding row; output head included; attention quadratic "
          "terms, losses, optimizer and MoE dispatch ignored)")
    if "kd" not in paired["last"] or "kd" in alone["last"]:
        raise SystemExit(f"expected a KD term only with the teacher: {alone['last']} / {paired['last']}")
    on_cpu = alone["device"] == "cpu"
    head = (f"{'run':<20}{'median step s':>14}{'min':>9}{'max':>9}{'tokens/s':>11}"
            + (f"{'median CPU s':>14}" if on_cpu else ""))
    print(head + "\n" + "-" * len(head))
    wall, cpu = {}, {}
    for name, res in (("alone", alone), ("teacher", paired)):
        wall[name], cpu[name] = statistics.median(res["times"]), statistics.median(res["cpu_times"])
        label = "student alone" if name == "alone" else "student + teacher"
        print(f"{label:<20}{wall[name]:>14.4f}{min(res['times']):>9.4f}{max(res['times']):>9.4f}"
              f"{tokens / wall[name]:>11.0f}" + (f"{cpu[name]:>14.4f}" if on_cpu else ""))
    measured = wall["teacher"] / wall["alone"]
    print(f"measured ratio (with teacher / alone)      {measured:.3f}")
    print(f"FLOP-ideal ratio (6S + 2T) / 6S            {ideal:.3f}")
    print(f"overhead of measured over ideal            {100 * (measured / ideal - 1):+.1f}%")
    if on_cpu:  # CPU seconds of the rank-0 process: less sensitive to other load on a shared machine
        cpu_ratio = cpu["teacher"] / cpu["alone"]
        print(f"same on CPU time: ratio {cpu_ratio:.3f}, overhead over ideal {100 * (cpu_ratio / ideal - 1):+.1f}%")


if __name__ == "__main__":
    main()
