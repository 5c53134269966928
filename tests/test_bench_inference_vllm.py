"""`bench-inference --engine vllm`: the worker protocol against a fake vLLM interpreter (tests/support/
fake_vllm_worker.py stands in for the vLLM environment: figures by the transformers side's definitions, greedy
agreement counted and a disagreement reported, worker failures surfaced), the refused combinations, the recipe's
`inference.engines`, and one test with real vLLM (marked `vllm`, skipped when .vllm-venv is absent)."""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_slim.engines.bench_inference_job import (
    BenchInferenceJob,
    bench_models,
    format_table,
    greedy_reference,
    markdown_table,
    measure_vllm,
)
from megatron_slim.engines.vllm_engine import VllmWorkerError, default_python, refusal
from megatron_slim.errors import UserError
from support import tiny_models
from support.hf_checkpoints import build_tiny_hf

FAKE = Path(__file__).parent / "support" / "fake_vllm_worker.py"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny Mixtral whose attention head dim vLLM's CPU backend accepts (32)."""
    path = tmp_path_factory.mktemp("vllm") / "mixtral"
    build_tiny_hf(tiny_models.mixtral(hidden_size=128, head_dim=32), seed=0).save_pretrained(path)
    return path


def _literal_greedy(model: Path, prompts, tokens: int) -> list[list[int]]:
    """Greedy continuations by a full-prefix argmax loop in transformers (no cache)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, local_files_only=True).eval()
    ids = prompts
    with torch.inference_mode():
        for _ in range(tokens):
            ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompts.shape[1]:].tolist()


@pytest.fixture
def fake_python(tmp_path) -> Path:
    """An executable standing in for the vLLM environment's interpreter: it runs the fake worker instead of the
    script it is given (which it records)."""
    path = tmp_path / "python3.11"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _job(model: Path, python: Path, **over) -> BenchInferenceJob:
    return BenchInferenceJob(**{"models": (str(model),), "prompt_len": 12, "gen_len": 5, "dtype": "float32",
                                "device": "cpu", "warmup": 1, "repeats": 3, "engines": ("vllm",),
                                "vllm_python": str(python)} | over)


def test_worker_protocol_figures_and_agreement(model, fake_python, tmp_path, monkeypatch):
    record = tmp_path / "record.json"
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(record))
    monkeypatch.setenv("PYTHONPATH", "/must/not/reach/the/worker")
    from megatron_slim.engines.bench_inference_job import make_prompts

    prompts = make_prompts(128, _job(model, fake_python, batch=2))
    monkeypatch.setenv("FAKE_VLLM_GREEDY", json.dumps(_literal_greedy(model, prompts, 6)))
    [got] = bench_models(_job(model, fake_python, batch=2))
    seen = json.loads(record.read_text())
    assert Path(seen["argv"][1]).name == "vllm_worker.py" and Path(seen["argv"][1]).is_file()
    assert {k: seen["env"].get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND",
                                            "VLLM_CPU_KVCACHE_SPACE", "HF_HUB_OFFLINE")} == {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1"}
    assert "PYTHONPATH" not in seen["env"] and int(seen["env"]["OMP_NUM_THREADS"]) >= 1
    request = seen["request"]
    assert {k: request[k] for k in ("model", "dtype", "gen_len", "warmup", "repeats")} == {
        "model": str(model), "dtype": "float32", "gen_len": 5, "warmup": 1, "repeats": 3}
    assert len(request["prompts"]) == 2 and all(len(r) == 12 for r in request["prompts"])
    assert request["prompts"] == prompts.tolist()  # the transformers side's prompts (seeded by vocabulary size)
    model = build_tiny_hf(tiny_models.mixtral(hidden_size=128, head_dim=32), seed=0)
    params = sum(p.numel() for p in model.parameters())
    assert (got.engine, got.params, got.peak_memory_bytes) == ("vllm", params, 12345)
    assert got.prefill_s == pytest.approx(0.3)  # median of 0.5, 0.1, 0.3
    assert got.decode_tokens_per_s == pytest.approx(2 * 5 / 0.3)  # batch * gen_len / median(generate - prefill)
    assert (got.greedy_checked, got.greedy_matching) == (2 * 6, 2 * 6)  # 1 + gen_len tokens per row, all equal
    assert "greedy = transformers (12 tokens)" in format_table([got], _job(model, fake_python))


def test_disagreement_is_reported(model, fake_python, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_MODE", "disagree")
    job = _job(model, fake_python, repeats=1)
    reference = greedy_reference(str(model), job, 6)
    monkeypatch.setenv("FAKE_VLLM_GREEDY", json.dumps(reference[0]))
    got = measure_vllm(str(model), job, reference)
    assert (got.greedy_checked, got.greedy_matching) == (6, 2)  # row 0 differs at its third token
    assert "DIFFERS from transformers: 2/6 leading greedy tokens agree" in markdown_table([("student", got)])


@pytest.mark.parametrize("mode,match", [("error", "vLLM failed on .*CPU GDN attention requires BF16"),
                                        ("garbage", "(?s)exited 3 without a JSON reply.*vLLM-like log line")])
def test_worker_failures_are_clear(model, fake_python, monkeypatch, mode, match):
    monkeypatch.setenv("FAKE_VLLM_MODE", mode)
    with pytest.raises(VllmWorkerError, match=match):
        measure_vllm(str(model), _job(model, fake_python, repeats=1), ([[0] * 6], 1, 128))


def _config(tmp_path: Path, name: str, cfg: dict) -> Path:
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps(cfg))
    return tmp_path / name


def test_known_broken_combinations_are_refused(tmp_path, model, fake_python):
    good_next = tiny_models.qwen3_next(head_dim=64, linear_key_head_dim=128, linear_value_head_dim=128)
    assert refusal(_config(tmp_path, "next", good_next), "bfloat16", "cpu") is None
    assert refusal(model, "float32", "cpu") is None
    cases = [(good_next, "float32", "cpu", "needs bfloat16"),
             (good_next | {"tie_word_embeddings": True}, "bfloat16", "cuda", "tied word embeddings"),
             (good_next | {"linear_key_head_dim": 32}, "bfloat16", "cpu", r"head dims \[128\].*\[32\]"),
             (tiny_models.mixtral(), "float32", "cpu", "CPU attention supports head dims.*the model has 16")]
    for i, (cfg, dtype, device, match) in enumerate(cases):
        reason = refusal(_config(tmp_path, f"case{i}", cfg), dtype, device)
        assert reason is not None and re.search(match, reason), (i, match, reason)
    with pytest.raises(UserError, match="refuses .*case0.*needs bfloat16"):
        _job(tmp_path / "case0", fake_python).validate()
    with pytest.raises(UserError, match="--vllm-python .*nowhere.*make vllm-env"):
        _job(model, tmp_path / "nowhere").validate()
    with pytest.raises(UserError, match="--engines must be distinct entries of transformers, vllm"):
        _job(model, fake_python, engines=("tgi",)).validate()


@pytest.mark.vllm
@pytest.mark.skipif(not os.access(default_python(), os.X_OK), reason="no vLLM environment (make vllm-env)")
def test_real_vllm_agrees_with_transformers(model):
    """Real vLLM (.vllm-venv) and transformers on one tiny model through the CLI: both engines' rows, greedy tokens
    equal, figures positive."""
    proc = subprocess.run([sys.executable, "-m", "megatron_slim.cli", "bench-inference", "--model", str(model),
                           "--engine", "transformers", "--engine", "vllm", "--prompt-len", "16", "--gen-len", "4",
                           "--dtype", "float32", "--device", "cpu", "--warmup", "0", "--repeats", "1", "--json"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    hf, vllm = report["models"]
    assert (hf["engine"], vllm["engine"]) == ("transformers", "vllm") and hf["params"] == vllm["params"]
    assert (vllm["greedy_checked"], vllm["greedy_matching"]) == (5, 5), vllm
    assert vllm["prefill_s"] > 0 and vllm["decode_tokens_per_s"] > 0 and vllm["peak_memory_bytes"] > 0
