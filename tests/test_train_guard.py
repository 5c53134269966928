"""A long run that wastes nothing: the non-finite guard (a NaN step changes no weight and no optimizer state, too
many in a row stop the run with DIVERGED_EXIT_CODE and keep the last good checkpoint), checkpoint retention
(keep_every milestones), metrics.jsonl holding each step once after a resume, the corpus check before compute,
and the wandb run id kept across a requeue (offline: no network)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from megatron_slim.checkpoint.mcore_reader import McoreReader
from megatron_slim.train import checkpointing
from megatron_slim.train.guard import DIVERGED_EXIT_CODE, INJECT_ENV
from support.train_assets import assets, cli, metrics, write_config  # noqa: F401  (assets is a fixture)


def _train(cfg: Path, inject: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != INJECT_ENV} | ({INJECT_ENV: inject} if inject else {})
    return subprocess.run([sys.executable, "-m", "megatron_slim.cli", "train", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=600, env=env)


def _tensors(save_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """Every tensor of a training checkpoint: weights and the optimizer's fp32 copies and Adam moments."""
    reader = McoreReader(checkpointing.iter_dir(save_dir, step))
    keys = sorted(reader.tensors)
    return dict(zip(keys, reader.read(keys)))


def _data_positions(bucket: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """Where the model's weights lie in a flat optimizer bucket (its fp32 `param` copy): megatron-core pads the
    buffers between parameters and saves the padding as allocated (uninitialised memory), so only these positions
    hold state."""
    mask = torch.zeros(bucket.numel(), dtype=torch.bool)
    for w in weights:  # grouped experts' weights ([experts, ...] in the checkpoint) are one parameter per expert
        for piece in (w.unbind(0) if w.dim() == 3 else [w]):
            flat = piece.flatten().float()
            for i in (bucket == flat[0]).nonzero().flatten().tolist():
                j = i + flat.numel()  # equal weights (norms initialised to ones) lie at distinct places
                if j <= bucket.numel() and not mask[i:j].any() and torch.equal(bucket[i:j], flat):
                    mask[i:j] = True
                    break
    return mask


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Weights equal bit for bit, and the optimizer's fp32 params and Adam moments at every weight's position."""
    assert a.keys() == b.keys()
    weights = [a[k] for k in a if not k.startswith("optimizer.")]
    for key in a:
        if not key.startswith("optimizer."):
            assert torch.equal(a[key], b[key]), key
    buckets = {k.rpartition(".")[0] for k in a if k.startswith("optimizer.") and k.endswith(".exp_avg")}
    assert buckets
    covered = 0
    for bucket in buckets:
        mask = _data_positions(a[f"{bucket}.param"], weights)
        covered += int(mask.sum())
        for kind in ("param", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a[f"{bucket}.{kind}"][mask], b[f"{bucket}.{kind}"][mask]), f"{bucket}.{kind}"
    assert covered == sum(w.numel() for w in weights)  # every weight's state was compared


def _steps(save_dir: Path) -> list[int]:
    return checkpointing.saved_steps(save_dir)


def test_nan_step_changes_nothing_and_milestones_survive_rotation(assets):
    """Step 5 of 6 has a NaN loss: its update is skipped (checkpoint 5 == checkpoint 4 bit for bit, optimizer
    state included), it is marked in metrics.jsonl, training goes on and ends with status 0; keep_last 2 with
    keep_every 2 leaves the milestones 2 and 4 besides the newest two."""
    cfg = write_config(assets, "nan_once", teacher=False, train={"train_iters": 6},
                       checkpoint={"save_interval": 1, "keep_last": 2, "keep_every": 2})
    proc = _train(cfg, inject="5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    save_dir = assets / "nan_once"
    records = metrics(assets, "nan_once")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped"] for r in records] == [False] * 4 + [True, False]
    assert all(r["loss"] == r["loss"] for r in records[:4] + records[5:])  # finite around the NaN step
    assert "step 5: non-finite loss; update skipped" in proc.stdout
    assert _steps(save_dir) == [2, 4, 5, 6]
    before, at, after = _tensors(save_dir, 4), _tensors(save_dir, 5), _tensors(save_dir, 6)
    _assert_same_state(before, at)
    assert any(not torch.equal(at[k], after[k]) for k in at if not k.startswith("optimizer."))  # trained again
    assert [checkpointing.train_state(save_dir, s)["finite"] for s in (4, 5, 6)] == [True, False, True]
    assert checkpointing.train_state(save_dir, 6)["data_samples"] == [0, 6 * 8]


def test_consecutive_nans_stop_the_run_and_keep_the_last_good_checkpoint(assets):
    """Steps 3 and 4 NaN with max_skipped_steps 2: the run stops at step 4 with DIVERGED_EXIT_CODE, saves nothing
    at step 4, names checkpoint 2 (the newest finite one), which rotation kept though keep_last is 1. Rerun without
    the fault: it resumes from checkpoint 3 and metrics.jsonl holds each step once."""
    cfg = write_config(assets, "diverged", teacher=False, train={"train_iters": 6}, guard={"max_skipped_steps": 2},
                       checkpoint={"save_interval": 1, "keep_last": 1})
    save_dir = assets / "diverged"
    proc = _train(cfg, inject="3,4")
    assert proc.returncode == DIVERGED_EXIT_CODE, proc.stderr[-3000:]
    assert f"the last checkpoint with a finite loss is {save_dir / 'iter_0000002'}" in proc.stdout, proc.stdout
    assert _steps(save_dir) == [2, 3] and (save_dir / "latest").read_text().strip() == "3"
    assert [r["skipped"] for r in metrics(assets, "diverged")] == [False, False, True, True]
    proc = _train(cfg)
    assert proc.returncode == 0 and "at step 3" in proc.stdout, proc.stderr[-3000:]
    records = metrics(assets, "diverged")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped"] for r in records] == [False, False, True, False, False, False]


def test_corpus_too_small_is_refused_before_any_model(assets):
    """The toy corpus holds ~14K training tokens: 100 steps of 8 x 32 tokens would read it ~1.8 times."""
    cfg = write_config(assets, "too_long", teacher=False, train={"train_iters": 100})
    proc = cli("train", "--config", str(cfg), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"requests 25,600 tokens of {assets / 'data'}" in proc.stderr and "data.max_epochs 1" in proc.stderr
    refused = assets / "too_long"  # refused before any model or dataset index was built, or a metric written
    assert not (refused / "data_cache").exists() and not (refused / "metrics.jsonl").exists()
    allowed = write_config(assets, "too_long", teacher=False, train={"train_iters": 100, "exit_interval": 1},
                           data={"max_epochs": 2})  # repeating the data knowingly: one step, then exit
    cli("train", "--config", str(allowed))


def test_wandb_offline_run_keeps_its_id_across_a_requeue(tmp_path: Path):
    """Two loggers on one save dir (a job and its requeue) log to the same wandb run id, offline (no network)."""
    from megatron_slim.train.metrics import WANDB_ID, MetricsLogger

    ids = []
    for attempt in range(2):
        logger = MetricsLogger(tmp_path, "run", {"attempt": attempt}, wandb_project="test", wandb_mode="offline")
        logger.log({"step": attempt + 1, "loss": 1.0})
        ids.append(logger._wandb.id)
        logger.close()
    assert ids[0] == ids[1] == (tmp_path / WANDB_ID).read_text().strip()
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{ids[0]}"))
    assert len(runs) == 2  # one local directory per attempt, one run id for `wandb sync`


def test_wandb_auto_mode_falls_back_to_offline_without_the_service(monkeypatch):
    """`auto` probes the service; a base URL nobody listens on (a closed local port) means offline."""
    from megatron_slim.train.metrics import resolve_wandb_mode

    with socket.socket() as s:  # a free port, closed again: connections to it are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    assert resolve_wandb_mode("auto") == "offline"
    assert resolve_wandb_mode("online") == "online"


def test_background_saves_resume_like_synchronous_saves(assets):
    """checkpoint.async_save: the same run, stopped at step 2 (exit_interval) and resumed to step 4, ends with the
    same weights, optimizer state and losses as with synchronous saves; the background saves completed in order."""
    runs = {}
    for background in (False, True):
        name = f"saves_async_{background}".lower()
        cfg = write_config(assets, name, teacher=False, train={"train_iters": 4, "exit_interval": 2},
                           checkpoint={"save_interval": 1, "keep_last": 0, "async_save": background})
        for _ in range(2):
            proc = _train(cfg)
            assert proc.returncode == 0, proc.stderr[-3000:]
        assert _steps(assets / name) == [1, 2, 3, 4] and (assets / name / "latest").read_text().strip() == "4"
        runs[background] = (_tensors(assets / name, 4), [r["loss"] for r in metrics(assets, name)])
    _assert_same_state(runs[False][0], runs[True][0])
    assert runs[False][1] == runs[True][1] and len(runs[True][1]) == 4


def test_guard_verdicts_spikes_and_the_skip_count(monkeypatch):
    """One process: a NaN is skipped; a loss above spike_factor x the running median is flagged (skipped only with
    skip_spikes) once the window holds 10 losses; max_skipped_steps consecutive skips exhaust the guard, an update
    in between resets the count; the injection variable is parsed strictly."""
    import pytest

    from megatron_slim.errors import UserError
    from megatron_slim.train.config import GuardSection
    from megatron_slim.train.guard import StepGuard, injected_nan_steps

    for skip_spikes in (False, True):
        guard = StepGuard(GuardSection(max_skipped_steps=2, spike_factor=2.0, spike_window=20, skip_spikes=skip_spikes))
        for loss in [1.0] * 9:
            assert not guard.verdict(loss).spike  # too few losses for a median yet
            guard.record(loss, skipped=False)
        assert not guard.verdict(3.0).spike
        guard.record(1.0, skipped=False)
        v = guard.verdict(3.0)
        assert v.spike and not v.non_finite and v.skip == skip_spikes and guard.median() == 1.0
        assert not guard.verdict(1.9).spike
    v = guard.verdict(float("nan"))
    assert v.non_finite and v.skip and not v.spike
    guard.record(float("nan"), skipped=True)
    guard.record(1.0, skipped=False)
    assert guard.consecutive == 0 and not guard.exhausted
    guard.record(float("inf"), skipped=True)
    guard.record(float("nan"), skipped=True)
    assert guard.exhausted and guard.total == 3 and guard.median() == 1.0  # non-finite losses never enter it
    monkeypatch.setenv(INJECT_ENV, "5, 9")
    assert injected_nan_steps() == {5, 9}
    for bad in ("x", "0"):
        monkeypatch.setenv(INJECT_ENV, bad)
        with pytest.raises(UserError, match=INJECT_ENV):
            injected_nan_steps()
