"""`megatron-slim bench-inference`: the --json schema on two tiny HF checkpoints, each measured in its own process,
the smaller reporting lower peak memory than the larger on the same settings, and the inputs it refuses."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_slim.engines.bench_inference_job import BenchInferenceJob
from megatron_slim.errors import UserError
from support import tiny_models
from support.hf_checkpoints import build_tiny_hf


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, int]]:
    """(directory, parameter count) of a small and a ~25x larger Mixtral."""
    root = tmp_path_factory.mktemp("bench_inference")
    out = {}
    for name, over in (("small", {}), ("large", {"hidden_size": 256, "intermediate_size": 256, "head_dim": 64})):
        model = build_tiny_hf(tiny_models.mixtral(**over), seed=0)
        model.save_pretrained(root / name)
        out[name] = (root / name, sum(p.numel() for p in model.parameters()))
    return out


def test_json_schema_and_memory_ordering(checkpoints):
    large, small = checkpoints["large"], checkpoints["small"]
    proc = subprocess.run([sys.executable, "-m", "megatron_slim.cli", "bench-inference", "--model", str(large[0]),
                           "--model", str(small[0]), "--prompt-len", "32", "--gen-len", "4", "--dtype", "float32",
                           "--device", "cpu", "--repeats", "2", "--json"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["settings"] == {"batch": 1, "prompt_len": 32, "gen_len": 4, "dtype": "float32", "device": "cpu",
                                  "repeats": 2, "engines": ["transformers"]}
    got = report["models"]
    assert [set(m) for m in got] == [{"path", "params", "peak_memory_bytes", "prefill_s", "decode_tokens_per_s",
                                      "engine", "greedy_checked", "greedy_matching"}] * 2
    assert [(m["engine"], m["greedy_checked"]) for m in got] == [("transformers", 0)] * 2
    assert [(m["path"], m["params"]) for m in got] == [(str(large[0]), large[1]), (str(small[0]), small[1])]
    assert all(m["prefill_s"] > 0 and m["decode_tokens_per_s"] > 0 for m in got)
    assert 0 < got[1]["peak_memory_bytes"] < got[0]["peak_memory_bytes"]
    assert got[0]["peak_memory_bytes"] >= 4 * large[1]  # the float32 weights at least


def test_a_large_parent_does_not_count_toward_a_models_peak(checkpoints):
    """A run measures its models after training them: 1 GB resident in the parent must not reach the figures of
    a model measured in a child (getrusage's ru_maxrss would carry it across fork and exec)."""
    import torch

    from megatron_slim.engines.bench_inference_job import bench_models

    ballast = torch.ones(256 * 2**20)  # 1 GiB, touched
    small = checkpoints["small"]
    [got] = bench_models(BenchInferenceJob(models=(str(small[0]),), prompt_len=16, gen_len=2, dtype="float32",
                                           device="cpu", warmup=0, repeats=1))
    assert ballast.sum().item() == ballast.numel()
    assert 4 * small[1] <= got.peak_memory_bytes < 2**28, got  # its float32 weights, far below the parent's GiB


def test_refused_inputs(checkpoints, tmp_path):
    (tmp_path / "model_config.json").write_text("{}")
    small = str(checkpoints["small"][0])
    cases = [(BenchInferenceJob(models=(str(tmp_path),)), "export it to HF first"),
             (BenchInferenceJob(models=(small,), batch=0), "--batch must be an integer >= 1, got 0"),
             (BenchInferenceJob(models=(small,), dtype="int8"), "--dtype"),
             (BenchInferenceJob(models=()), "at least one --model")]
    for job, match in cases:
        with pytest.raises(UserError, match=match):
            job.validate()
