"""launch.sh on a real one-node SLURM cluster (scripts/local_slurm.sh) and with torchrun.

The cluster runs as root on localhost and is installed with apt-get when missing; the tests that need it are
skipped only where that is impossible (not Linux, not root, or SLURM missing and no apt-get). The --dry-run and
torchrun tests need neither.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch.sh"
LOCAL_SLURM = REPO / "scripts" / "local_slurm.sh"
SUPPORT = Path(__file__).resolve().parent / "support"
SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "munged")


def _cannot_run_cluster() -> str | None:
    if not sys.platform.startswith("linux"):
        return "the local SLURM cluster needs Linux"
    if os.geteuid() != 0:
        return "the local SLURM cluster runs its daemons as root"
    if not all(shutil.which(b) for b in SLURM_BINARIES) and not shutil.which("apt-get"):
        return "SLURM is not installed and apt-get is unavailable"
    return None


def _clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any SLURM job context (pytest itself may run inside a job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Start a private cluster (first use installs the packages) and stop it after the session."""
    reason = _cannot_run_cluster()
    if reason:
        pytest.skip(reason)
    cluster = tmp_path_factory.mktemp("slurm")
    try:
        started = time.monotonic()
        out = subprocess.run(["bash", str(LOCAL_SLURM), "start", str(cluster)], capture_output=True, text=True,
                             timeout=900, env=_clean_env())
        assert out.returncode == 0, f"cluster start failed:\n{out.stdout}\n{out.stderr}"
        print(f"\nlocal SLURM cluster up in {time.monotonic() - started:.1f}s ({cluster})")
        match = re.search(r"^export SLURM_CONF=(.+)$", out.stdout, re.M)
        assert match, out.stdout
        yield _clean_env(SLURM_CONF=shlex.split(match.group(1))[0])
    finally:
        subprocess.run(["bash", str(LOCAL_SLURM), "stop", str(cluster)], capture_output=True, timeout=120)


def _job_info(env: dict[str, str], job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (empty once the job is purged)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=env, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def test_submit_two_tasks_all_reduce(slurm_env: dict[str, str], tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    out = subprocess.run(
        ["bash", str(LAUNCH), "--submit", "--nodes", "1", "--tasks-per-node", "2", "--gpus-per-node", "0",
         "--job-name", "allreduce", "--log-dir", str(logs), "--wait", "--exec", "--",
         sys.executable, str(SUPPORT / "slurm_allreduce.py")],
        capture_output=True, text=True, env=slurm_env, timeout=120)
    job_id = out.stdout.split(";")[0].strip()
    log = (logs / f"allreduce-{job_id}.out").read_text() if job_id.isdigit() else ""
    err = (logs / f"allreduce-{job_id}.err").read_text() if job_id.isdigit() else ""
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n{log}\n{err}"
    lines = sorted(line for line in log.splitlines() if line.startswith("rank="))
    assert lines == ["rank=0 world=2 local_rank=0 sum=1", "rank=1 world=2 local_rank=1 sum=1"], log + err
    assert re.search(r"MASTER_ADDR=\S+ MASTER_PORT=\d+", err), err


@pytest.mark.parametrize("signal_name", ["USR1", "TERM"])
def test_preempt_requeue_resume(slurm_env: dict[str, str], tmp_path: Path, signal_name: str) -> None:
    state, logs = tmp_path / "state", tmp_path / "logs"
    state.mkdir()
    target = 40
    out = subprocess.run(
        ["bash", str(LAUNCH), "--submit", "--tasks-per-node", "2", "--gpus-per-node", "0", "--requeue",
         "--job-name", "preempt", "--log-dir", str(logs), "--exec", "--",
         sys.executable, str(SUPPORT / "slurm_preemptible.py"), str(state), "--target", str(target),
         "--interval", "0.1"],
        capture_output=True, text=True, env=slurm_env, timeout=60)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.split(";")[0].strip()
    assert job_id.isdigit(), out.stdout
    counters = [state / "counter-0", state / "counter-1"]
    try:
        _wait_until(lambda: all(c.exists() and int(c.read_text() or 0) >= 3 for c in counters), 60,
                    "both ranks to start counting")
        # What SLURM does before the time limit with --signal=B:USR1@N (or a preemption's SIGTERM).
        subprocess.run(["scancel", f"--signal={signal_name}", "--batch", job_id], check=True, env=slurm_env,
                       timeout=30)
        # The requeued job waits cred_expire (10 s on the local cluster) before it may start again.
        info: dict[str, str] = {}

        def job_done() -> bool:
            info.update(_job_info(slurm_env, job_id))
            return info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")

        _wait_until(job_done, 90, "the requeued job to finish", interval=0.5)
    finally:
        subprocess.run(["scancel", job_id], env=slurm_env, timeout=30)
    log = "".join(p.read_text() for p in sorted(logs.glob(f"preempt-{job_id}.*")))
    assert info["JobState"] == "COMPLETED", (info, log)
    assert int(info["Restarts"]) >= 1, (info, log)
    for rank in (0, 1):
        events = (state / f"events-{rank}").read_text().splitlines()
        assert len(events) == 4, events
        first, preempted, resumed, finished = events
        assert first == "start 0 restart=0", events
        match = re.fullmatch(rf"preempted (\d+) by SIG{signal_name}", preempted)
        assert match, events
        saved = int(match.group(1))
        assert 3 <= saved < target, events
        assert resumed == f"start {saved} restart=1", events
        assert finished == f"finished {target}", events
    assert "requeueing job" in log, log


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny plain-training run: the 2-layer Qwen3-MoE student checkpoint and the toy indexed dataset of
    support/train_assets.py (no teacher: the run tests the launcher, tests/test_train.py tests distillation)."""
    from support.run_assets import build

    root = tmp_path_factory.mktemp("slurm_train")
    build("train", root, env=_clean_env())
    return root


def _metrics(save_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]


def test_preempt_requeue_resumes_real_trainer(slurm_env: dict[str, str], tiny_run: Path, tmp_path: Path) -> None:
    """`megatron-slim train` on 2 CPU tasks (gloo) through `launch.sh --submit --requeue`: SIGUSR1 mid-training
    (what --signal=B:USR1@120 sends before the time limit) -> checkpoint, exit 75, requeue with the same job id,
    resume from the checkpoint, finish; the loss sequence equals an uninterrupted 2-rank run's."""
    from support.run_assets import run_config

    iters = 40
    run, reference = run_config(tiny_run, "requeued", iters), run_config(tiny_run, "straight", iters)
    save_dir = tiny_run / "requeued"
    logs, straight_log = tmp_path / "logs", tmp_path / "straight.log"
    # The uninterrupted reference runs meanwhile (same 2-rank data-parallel layout, local ranks).
    with open(straight_log, "w") as f:
        straight = subprocess.Popen(
            [sys.executable, "-m", "megatron_slim.cli", "train", "--config", str(reference), "--nproc", "2"],
            stdout=f, stderr=subprocess.STDOUT, env=_clean_env(), cwd=REPO)
    job_id = ""
    info: dict[str, str] = {}

    def log() -> str:
        return "".join(p.read_text() for p in sorted(logs.glob(f"train-{job_id}.*")))

    try:
        out = subprocess.run(
            ["bash", str(LAUNCH), "--submit", "--tasks-per-node", "2", "--gpus-per-node", "0", "--requeue",
             "--job-name", "train", "--log-dir", str(logs), "--", "train", "--config", str(run)],
            capture_output=True, text=True, env=slurm_env, timeout=60)
        assert out.returncode == 0, out.stderr
        job_id = out.stdout.split(";")[0].strip()
        assert job_id.isdigit(), out.stdout

        def trained() -> bool:
            info.update(_job_info(slurm_env, job_id))
            assert info.get("JobState") in ("PENDING", "CONFIGURING", "RUNNING"), (info, log())
            return (save_dir / "metrics.jsonl").is_file()

        # Step 1 is logged once every rank is past set-up (the trainer's signal handlers are installed).
        started = time.monotonic()
        _wait_until(trained, 300, "the first training step", interval=0.05)
        print(f"first step after {time.monotonic() - started:.1f}s")
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, env=slurm_env, timeout=30)

        def job_done() -> bool:
            info.update(_job_info(slurm_env, job_id))
            return info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")

        _wait_until(job_done, 400, "the requeued job to finish", interval=0.5)
        print(f"requeued job done after {time.monotonic() - started:.1f}s")
        assert straight.wait(timeout=300) == 0, straight_log.read_text()[-4000:]
        print(f"reference run done after {time.monotonic() - started:.1f}s")
    finally:
        if straight.poll() is None:
            straight.kill()
            straight.wait()
        if job_id:
            subprocess.run(["scancel", job_id], env=slurm_env, timeout=30)
    text = log()
    assert info["JobState"] == "COMPLETED", (info, text)
    assert info["Restarts"] == "1", (info, text)
    stopped = re.findall(r"stop signal: checkpointing at step (\d+) and exiting for requeue", text)
    resumed = re.findall(rf"resumed from {re.escape(str(save_dir))} at step (\d+)", text)
    assert len(stopped) == 1 and resumed == stopped, text
    assert 0 < int(resumed[0]) < iters, text
    assert "step exited 75: requeueing job" in text, text
    got, want = _metrics(save_dir), _metrics(tiny_run / "straight")
    assert [r["step"] for r in got] == list(range(1, iters + 1)), [r["step"] for r in got]
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    assert [r["lr"] for r in got] == [r["lr"] for r in want]
    assert (save_dir / "latest").read_text().strip() == str(iters)


def test_dry_run_quotes_submit_command(tmp_path: Path) -> None:
    out = subprocess.run(
        ["bash", str(LAUNCH), "--submit", "--dry-run", "--nodes", "2", "--gpus-per-node", "8", "--time", "01:00:00",
         "--partition", "gpu", "--account", "proj", "--requeue", "--log-dir", str(tmp_path / "my logs"),
         "--container-image", "nvcr.io/nvidia/pytorch:25.01-py3", "--container-mounts", "/data set:/data",
         "--env", "GREETING=hello world", "--env", "QUOTE=it's", "--dependency", "afterok:123", "--",
         "demo", "--name", "a b"],
        capture_output=True, text=True, env=_clean_env(), timeout=30)
    assert out.returncode == 0, out.stderr
    words = shlex.split(out.stdout)
    script = words.index(str(LAUNCH))
    sbatch, inner = words[:script], words[script + 1:]
    assert sbatch[0] == "sbatch"
    for opt in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=01:00:00", "--partition=gpu",
                "--account=proj", "--requeue", "--signal=B:USR1@120", "--dependency=afterok:123", "--parsable",
                f"--output={tmp_path}/my logs/%x-%j.out", f"--error={tmp_path}/my logs/%x-%j.err"):
        assert opt in sbatch, (opt, sbatch)
    assert inner[inner.index("--container-image") + 1] == "nvcr.io/nvidia/pytorch:25.01-py3"
    assert inner[inner.index("--container-mounts") + 1] == "/data set:/data"
    envs = [inner[i + 1] for i, w in enumerate(inner) if w == "--env"]
    assert envs == ["GREETING=hello world", "QUOTE=it's"]
    assert inner[inner.index("--"):] == ["--", "demo", "--name", "a b"]
    assert not (tmp_path / "my logs").exists(), "--dry-run must not create the log dir"

    # Inside the job, the same options become the srun command.
    job_env = _clean_env(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="vm", SLURM_JOB_NUM_NODES="2")
    out = subprocess.run(["bash", str(LAUNCH), "--dry-run", *inner], capture_output=True, text=True, env=job_env,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert shlex.split(out.stdout) == [
        "srun", "--kill-on-bad-exit=1", "--nodes=2", "--ntasks-per-node=8", "--ntasks=16",
        "--container-image=nvcr.io/nvidia/pytorch:25.01-py3", "--container-mounts=/data set:/data",
        "python", "-m", "megatron_slim.cli", "demo", "--name", "a b"]


def test_killed_rank_ends_the_job(slurm_env: dict[str, str], tmp_path: Path) -> None:
    """srun --kill-on-bad-exit=1: when one rank dies (kill -9), the ranks still waiting for it are ended and the job
    fails at once, instead of holding its allocation until the time limit."""
    logs = tmp_path / "logs"
    out = subprocess.run(
        ["bash", str(LAUNCH), "--submit", "--tasks-per-node", "2", "--gpus-per-node", "0", "--job-name", "hang",
         "--log-dir", str(logs), "--exec", "--", sys.executable, str(SUPPORT / "slurm_hang.py"), str(tmp_path)],
        capture_output=True, text=True, env=slurm_env, timeout=60)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.split(";")[0].strip()
    assert job_id.isdigit(), out.stdout
    pids = [tmp_path / "pid-0", tmp_path / "pid-1"]
    info: dict[str, str] = {}
    try:
        _wait_until(lambda: all(p.is_file() and p.read_text() for p in pids), 60, "both ranks to start")
        survivor = int(pids[0].read_text())
        os.kill(int(pids[1].read_text()), 9)
        killed_at = time.monotonic()

        def ended() -> bool:
            info.update(_job_info(slurm_env, job_id))
            return info.get("JobState") not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", None)

        _wait_until(ended, 60, "the job to end after a rank was killed", interval=0.5)
        print(f"job ended {time.monotonic() - killed_at:.1f}s after the kill")
    finally:
        subprocess.run(["scancel", job_id], env=slurm_env, timeout=30)
    log = "".join(p.read_text() for p in sorted(logs.glob(f"hang-{job_id}.*")))
    assert info["JobState"] == "FAILED", (info, log)
    assert not Path(f"/proc/{survivor}").exists(), "the surviving rank must have been ended"


def test_array_runs_one_task_per_part_on_cpu_nodes(slurm_env: dict[str, str], tmp_path: Path) -> None:
    """`launch.sh --submit --array 3 --cpu-partition debug`: three one-task jobs (no GPUs), task I of N sees
    SLURM_ARRAY_TASK_ID=I and SLURM_ARRAY_TASK_COUNT=N; here each runs `megatron-slim preprocess` on part I of a
    pre-tokenized corpus, and part I's dataset holds exactly part I's tokens."""
    import numpy as np

    parts = [[[i * 100 + d * 10 + t for t in range(3 + d)] for d in range(2 + i)] for i in range(3)]
    for i, docs in enumerate(parts):
        (tmp_path / f"part-{i}.jsonl").write_text("".join(json.dumps({"ids": doc}) + "\n" for doc in docs))
    script = ('echo "task $SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_TASK_COUNT gpus=${SLURM_GPUS_ON_NODE:-0}"; '
              'exec "$1" -m megatron_slim.cli preprocess --input "$2/part-$SLURM_ARRAY_TASK_ID.jsonl" '
              '--output-prefix "$2/out-$SLURM_ARRAY_TASK_ID" --tokenizer none --json-key ids --vocab-size 1000 '
              '--no-eod')
    logs = tmp_path / "logs"
    out = subprocess.run(
        ["bash", str(LAUNCH), "--submit", "--array", "3", "--cpu-partition", "debug", "--cpu-time", "00:10:00",
         "--job-name", "shards", "--log-dir", str(logs), "--wait", "--exec", "--", "bash", "-c", script, "task",
         sys.executable, str(tmp_path)],
        capture_output=True, text=True, env=slurm_env, cwd=REPO, timeout=300)
    array_id = out.stdout.split(";")[0].strip()
    logs_text = {p.name: p.read_text() for p in sorted(logs.glob("*"))} if logs.is_dir() else {}
    assert out.returncode == 0, (out.stdout, out.stderr, logs_text)
    for i, docs in enumerate(parts):
        assert f"task {i} of 3 gpus=0" in logs_text[f"shards-{array_id}_{i}.out"], logs_text
        tokens = np.fromfile(tmp_path / f"out-{i}.bin", dtype=np.uint16)
        assert tokens.tolist() == [t for doc in docs for t in doc], (i, tokens)


def test_array_preprocess_shards_merge_into_the_unsharded_dataset(slurm_env: dict[str, str], tmp_path: Path) -> None:
    """The corpus path end to end: `launch.sh --submit --array 3 --cpu-partition debug -- preprocess --input DIR
    --shard auto` tokenizes a third of the files per array task; `merge-datasets` of the three shards in order is
    byte for byte the dataset one unsharded `preprocess` writes."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        docs = [[i * 100 + d * 10 + t for t in range(2 + (i + d) % 4)] for d in range(1 + i % 3)]
        (corpus / f"part-{i}.jsonl").write_text("".join(json.dumps({"ids": doc}) + "\n" for doc in docs))
    common = ["--tokenizer", "none", "--json-key", "ids", "--vocab-size", "1000", "--eod-id", "999"]
    logs = tmp_path / "logs"
    out = subprocess.run(
        ["bash", str(LAUNCH), "--submit", "--array", "3", "--cpu-partition", "debug", "--job-name", "tok",
         "--log-dir", str(logs), "--wait", "--", "preprocess", "--input", str(corpus), "--output-prefix",
         str(tmp_path / "sharded"), *common, "--shard", "auto"],
        capture_output=True, text=True, env=slurm_env, cwd=REPO, timeout=600)
    logs_text = {p.name: p.read_text()[-3000:] for p in sorted(logs.glob("*"))} if logs.is_dir() else {}
    assert out.returncode == 0, (out.stdout, out.stderr, logs_text)
    shards = [str(tmp_path / f"sharded-{i:05d}-of-00003") for i in range(3)]
    for shard in shards:
        assert Path(shard + ".idx").is_file() and Path(shard + ".manifest.json").is_file(), (shard, logs_text)
    env = _clean_env()
    for args in (["merge-datasets", "--inputs", *shards, "--output-prefix", str(tmp_path / "merged")],
                 ["preprocess", "--input", str(corpus), "--output-prefix", str(tmp_path / "whole"), *common]):
        done = subprocess.run([sys.executable, "-m", "megatron_slim.cli", *args], capture_output=True, text=True,
                              env=env, cwd=REPO, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"merged{ext}").read_bytes() == (tmp_path / f"whole{ext}").read_bytes(), ext


def test_dry_run_array_submits_cpu_tasks() -> None:
    out = subprocess.run(
        ["bash", str(LAUNCH), "--submit", "--dry-run", "--array", "64%8", "--cpu-partition", "cpu", "--cpu-time",
         "02:00:00", "--cpu-qos", "long", "--cpu-mem", "64G", "--cpu-cpus", "16", "--cpu-sbatch-arg=--exclusive",
         "--sbatch-arg=--gres=gpu:8", "--account", "proj", "--log-dir", "logs", "--",
         "preprocess", "--input", "corpus/*.parquet", "--shard", "auto"],
        capture_output=True, text=True, env=_clean_env(), timeout=30)
    assert out.returncode == 0, out.stderr
    words = shlex.split(out.stdout)
    script = words.index(str(LAUNCH))
    assert words[:script] == [
        "sbatch", "--parsable", "--job-name=megatron-slim", "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=16",
        "--mem=64G", "--time=02:00:00", "--partition=cpu", "--qos=long", "--account=proj",
        "--output=logs/%x-%A_%a.out", "--error=logs/%x-%A_%a.err", "--array=0-63%8", "--exclusive"]
    assert words[script + 1:] == ["--tasks-per-node", "1", "--gpus-per-node", "0", "--", "preprocess", "--input",
                                  "corpus/*.parquet", "--shard", "auto"]


def _chain_dry_run(*launch_args: str) -> list[list[str]]:
    out = subprocess.run(["bash", str(LAUNCH), "--submit", "--chain", "--dry-run", *launch_args], capture_output=True,
                         text=True, env=_clean_env(), cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    return [shlex.split(line) for line in out.stdout.splitlines()]


def test_chain_dry_run_one_job_per_stage(tmp_path: Path) -> None:
    """--chain: one sbatch per stage, each after the one before it, each running `run ... --stage NAME`."""
    jobs = _chain_dry_run(
        "--stages", "prepare,depth,width", "--gpus-per-node", "0", "--tasks-per-node", "2", "--requeue",
        "--job-name", "tiny", "--dependency", "afterok:41", "--log-dir", str(tmp_path / "my logs"),
        "--env", "GREETING=hello world", "--", "run", "my recipe.yaml", "--workdir", "work dir", "--no-progress")
    assert len(jobs) == 3
    previous = None
    for stage, words in zip(("prepare", "depth", "width"), jobs):
        script = words.index(str(LAUNCH))
        sbatch, inner = words[:script], words[script + 1:]
        assert sbatch[:2] == ["sbatch", "--parsable"], sbatch
        for opt in (f"--job-name=tiny-{stage}", "--nodes=1", "--ntasks-per-node=2", "--requeue",
                    "--signal=B:USR1@120", f"--output={tmp_path}/my logs/%x-%j.out", "--kill-on-invalid-dep=yes"):
            assert opt in sbatch, (opt, sbatch)
        assert "--wait" not in sbatch and not any(w.startswith("--gpus-per-node") for w in sbatch), sbatch
        deps = [w for w in sbatch if w.startswith("--dependency=")]
        assert deps == [f"--dependency=afterok:{f'<{previous}>' if previous else '41'}"], sbatch
        assert inner[inner.index("--env") + 1] == "GREETING=hello world"
        assert inner[inner.index("--"):] == ["--", "run", "my recipe.yaml", "--workdir", "work dir", "--no-progress",
                                             "--stage", stage]
        previous = stage
    assert not (tmp_path / "my logs").exists(), "--dry-run must not create the log dir"

    # --wait: one waiting sbatch per job; without --dependency the first job has none.
    jobs = _chain_dry_run("--stages", "a,b", "--wait", "--", "run", "r.yaml", "--workdir", "w")
    assert ["--wait" in words for words in jobs] == [True, True]
    assert [any(w.startswith("--dependency=") for w in words) for words in jobs] == [False, True]


def test_chain_submits_variants_as_chains_after_the_shared_job() -> None:
    """With variants: `shared` first, then each variant its own chain, its first stage after the shared job."""
    jobs = _chain_dry_run("--stages", "shared,a/depth,a/width,b/depth,b/width", "--job-name", "s", "--", "run",
                          "r.yaml", "--workdir", "w")
    deps = {words[-1]: [w for w in words if w.startswith("--dependency=")] for words in jobs}
    assert deps == {"shared": [], "a/depth": ["--dependency=afterok:<shared>"],
                    "a/width": ["--dependency=afterok:<a/depth>"], "b/depth": ["--dependency=afterok:<shared>"],
                    "b/width": ["--dependency=afterok:<b/depth>"]}
    assert [w for words in jobs for w in words if w.startswith("--job-name=")] == [
        "--job-name=s-shared", "--job-name=s-a-depth", "--job-name=s-a-width", "--job-name=s-b-depth",
        "--job-name=s-b-width"]


def test_chain_lists_the_recipe_stages() -> None:
    """Without --stages, the stages are those `megatron-slim run RECIPE --workdir DIR --list-stages` prints."""
    _needs_run_command()
    if not (REPO / "examples" / "slimqwen" / "recipe.yaml").is_file():
        pytest.skip("examples/slimqwen/recipe.yaml is not in this tree")
    jobs = _chain_dry_run("--", "run", "examples/slimqwen/recipe.yaml", "--workdir", "/runs/slimqwen")
    assert [words[-4:] for words in jobs] == [["--workdir", "/runs/slimqwen", "--stage", "depth"],
                                              ["--workdir", "/runs/slimqwen", "--stage", "width"]]


def _sbatch_and_inner(words: list[str]) -> tuple[list[str], list[str]]:
    script = words.index(str(LAUNCH))
    return words[:script], words[script + 1:]


def test_chain_dry_run_puts_single_process_steps_on_cpu_nodes() -> None:
    """--chain --cpu-partition: the jobs of `run --list-jobs`, the CPU ones (teacher conversion and tokenization,
    each stage's pruning, the export) as one task on one node of the CPU partition with the --cpu-* options, the
    GPU ones with the job's options; each after the one before it, each running `run ... --job NAME`."""
    if not (REPO / "examples" / "slimqwen" / "recipe.yaml").is_file():
        pytest.skip("examples/slimqwen/recipe.yaml is not in this tree")
    jobs = _chain_dry_run(
        "--nodes", "16", "--partition", "gpu", "--time", "04:00:00", "--cpu-partition", "cpu", "--cpu-time",
        "12:00:00", "--cpu-qos", "cpu-long", "--cpu-mem", "900G", "--cpu-cpus", "64", "--account", "proj",
        "--requeue", "--job-name", "sq", "--", "run", "examples/slimqwen/recipe.yaml", "--workdir", "/runs/sq")
    names = ["prepare", "depth.importance", "depth.prune", "depth", "width.prune", "width", "final.export"]
    assert [words[-1] for words in jobs] == names
    previous = None
    for name, words in zip(names, jobs):
        sbatch, inner = _sbatch_and_inner(words)
        assert inner[inner.index("--"):] == ["--", "run", "examples/slimqwen/recipe.yaml", "--workdir", "/runs/sq",
                                             "--job", name]
        cpu = name in ("prepare", "depth.prune", "width.prune", "final.export")
        shape = (["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=64", "--mem=900G", "--time=12:00:00",
                  "--partition=cpu", "--qos=cpu-long"] if cpu else
                 ["--nodes=16", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=04:00:00", "--partition=gpu"])
        assert sbatch[3:3 + len(shape)] == shape, (name, sbatch)
        assert sbatch[3 + len(shape):3 + len(shape) + 2] == ["--account=proj", "--requeue"], sbatch
        assert inner[:4] == (["--tasks-per-node", "1", "--gpus-per-node", "0"] if cpu else
                             ["--tasks-per-node", "8", "--gpus-per-node", "8"]), inner
        deps = [w for w in sbatch if w.startswith("--dependency=")]
        assert deps == ([f"--dependency=afterok:<{previous}>"] if previous else []), (name, sbatch)
        previous = name


def test_chain_cpu_jobs_of_variants_and_named_jobs() -> None:
    """--stages NAME:cpu|gpu: the jobs of the steps variants share chain one after another, each variant's jobs
    chain after the last shared one."""
    jobs = _chain_dry_run(
        "--stages", "shared.prepare:cpu,shared.s.importance:gpu,a/s.prune:cpu,a/s,b/s.prune:cpu,b/s:gpu",
        "--cpu-partition", "cpu", "--job-name", "v", "--", "run", "r.yaml", "--workdir", "w")
    got = {words[-1]: ([w for w in words if w.startswith("--dependency=")],
                       next(w for w in words if w.startswith("--partition=") or w == str(LAUNCH))) for words in jobs}
    assert got == {"shared.prepare": ([], "--partition=cpu"),
                   "shared.s.importance": (["--dependency=afterok:<shared.prepare>"], str(LAUNCH)),
                   "a/s.prune": (["--dependency=afterok:<shared.s.importance>"], "--partition=cpu"),
                   "a/s": (["--dependency=afterok:<a/s.prune>"], str(LAUNCH)),
                   "b/s.prune": (["--dependency=afterok:<shared.s.importance>"], "--partition=cpu"),
                   "b/s": (["--dependency=afterok:<b/s.prune>"], str(LAUNCH))}


@pytest.mark.parametrize("launch_args, message", [
    (["--submit", "--chain", "--", "train", "--config", "x.yaml"], "--chain submits the stages of `run RECIPE"),
    (["--submit", "--chain", "--nodes", "2", "--stages", "a", "--", "run", "r", "--workdir", "w"],
     "name a CPU partition with --cpu-partition P"),
    (["--submit", "--chain", "--cpu-partition", "c", "--stages", "a", "--", "run", "r", "--workdir", "w", "--job", "a"],
     "--chain adds --job NAME to each job; do not give --job"),
    (["--submit", "--chain", "--stages", "a:cpu", "--", "run", "r", "--workdir", "w"], "give --cpu-partition"),
    (["--submit", "--chain", "--cpu-partition", "c", "--stages", "a:tpu", "--", "run", "r", "--workdir", "w"],
     "unknown kind of job 'tpu'"),
    (["--submit", "--cpu-time", "1:00:00", "--", "info"], "--cpu-time shapes the CPU jobs"),
    (["--submit", "--array", "0", "--", "info"], "--array wants N or N%M"),
    (["--submit", "--chain", "--array", "2", "--", "run", "r", "--workdir", "w"], "not a --chain"),
    (["--array", "2", "--", "info"], "--array only applies with --submit"),
    (["--submit", "--chain", "--exec", "--", "run", "r", "--workdir", "w"], "not --exec"),
    (["--submit", "--chain", "--stages", "a", "--", "run", "r", "--workdir", "w", "--stage", "a"],
     "do not give --stage"),
    (["--submit", "--chain", "--stages", "a,b/c/d", "--", "run", "r", "--workdir", "w"], "unusable stage name 'b/c/d'"),
    (["--submit", "--stages", "a", "--", "run", "r", "--workdir", "w"], "--stages only applies with --chain"),
    (["--chain", "--", "run", "r", "--workdir", "w"], "--chain only applies with --submit"),
])
def test_chain_refuses_bad_requests(launch_args: list[str], message: str) -> None:
    out = subprocess.run(["bash", str(LAUNCH), "--dry-run", *launch_args], capture_output=True, text=True,
                         env=_clean_env(), timeout=30)
    assert out.returncode == 2 and message in out.stderr, (out.returncode, out.stderr)
    assert out.stdout == ""


def _needs_run_command() -> None:
    if not (REPO / "megatron_slim" / "commands" / "run.py").is_file():
        pytest.skip("megatron_slim/commands/run.py (the recipe orchestrator `megatron-slim run`) is not in this tree")


@pytest.fixture(scope="module")
def chain_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _needs_run_command()
    from support.run_assets import build

    root = tmp_path_factory.mktemp("slurm_chain")
    build("chain", root, env=_clean_env())
    return root


def _chain_job_ids(proc: subprocess.Popen, stages: list[str]) -> dict[str, str]:
    """The `<job id> <stage>` lines launch.sh --chain prints, one per stage, as soon as each job is submitted."""
    ids: dict[str, str] = {}
    assert proc.stdout is not None
    for stage in stages:
        line = proc.stdout.readline()
        match = re.fullmatch(r"(\d+) (\S+)\n", line)
        assert match and match.group(2) == stage, (line, ids)
        ids[stage] = match.group(1)
    return ids


@pytest.mark.slow
def test_chain_runs_recipe_stages_with_requeue(slurm_env: dict[str, str], chain_assets: Path, tmp_path: Path) -> None:
    """`launch.sh --submit --chain --requeue --wait -- run RECIPE --workdir DIR`: one job per stage, the second
    after the first; SIGUSR1 during the first stage's distillation requeues that job (same id) and it resumes from
    its checkpoint while the second waits; the second then runs its stage plus the export and report."""
    from support.run_assets import STAGES, recipe, write_recipe

    path = write_recipe(chain_assets, "chain", recipe(chain_assets, steps_per_stage=20))
    work, logs = tmp_path / "work", tmp_path / "logs"
    proc = subprocess.Popen(
        ["bash", str(LAUNCH), "--submit", "--chain", "--wait", "--requeue", "--gpus-per-node", "0",
         "--tasks-per-node", "1", "--job-name", "chain", "--log-dir", str(logs), "--",
         "run", str(path), "--workdir", str(work), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=slurm_env, cwd=tmp_path)
    ids: dict[str, str] = {}
    seen: dict[str, dict[str, str]] = {stage: {} for stage in STAGES}  # last `scontrol show job` of each job

    def poll() -> None:
        for stage, job_id in ids.items():
            info = _job_info(slurm_env, job_id)
            if info:  # empty once the job is purged (MinJobAge after it ended)
                seen[stage] = info

    def log(stage: str) -> str:
        return "".join(p.read_text() for p in sorted(logs.glob(f"chain-{stage}-{ids.get(stage)}.*")))

    try:
        ids = _chain_job_ids(proc, STAGES)
        poll()
        assert seen["width"]["JobState"] == "PENDING", seen
        assert seen["width"]["Dependency"].startswith(f"afterok:{ids['depth']}"), seen

        def distilling() -> bool:
            poll()
            if proc.poll() is not None:
                pytest.fail(f"the chain ended (exit {proc.returncode}) before distilling:\n{log('depth')[-8000:]}")
            return (work / "depth" / "train" / "metrics.jsonl").is_file()

        _wait_until(distilling, 600, "the depth stage's distillation", interval=0.1)
        subprocess.run(["scancel", "--signal=USR1", "--batch", ids["depth"]], check=True, env=slurm_env,
                       timeout=30)

        def chain_done() -> bool:
            poll()
            return proc.poll() is not None

        _wait_until(chain_done, 900, "the chain to finish", interval=0.5)
        stderr = proc.stderr.read() if proc.stderr else ""
        if proc.returncode != 0:
            pytest.fail(f"the chain failed (exit {proc.returncode}): {stderr}\n--- depth:\n{log('depth')[-6000:]}\n"
                        f"--- width:\n{log('width')[-6000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if ids:
            subprocess.run(["scancel", *ids.values()], env=slurm_env, timeout=30)
    depth, width = log("depth"), log("width")
    assert int(seen["depth"]["Restarts"]) == 1, (seen, depth)
    assert seen["width"].get("JobState", "COMPLETED") == "COMPLETED", seen
    assert "stop  depth/distill: checkpointed" in depth and "requeueing job" in depth, depth
    resumed = re.findall(r"resumed from \S+/depth/train at step (\d+)", depth)
    assert len(resumed) == 1 and 0 < int(resumed[0]) < 20, depth
    assert "done  depth/eval" in depth and "width/" not in depth and "final/" not in depth, depth
    assert "depth/distill" not in width.replace("skip  depth/", ""), width
    for step in ("width/importance", "width/distill", "final/export", "final/report"):
        assert f"done  {step}" in width, (step, width)
    state = json.loads((work / "state.json").read_text())["steps"]
    assert all(entry["status"] == "done" for entry in state.values()), state
    assert (work / "export" / "hf" / "config.json").is_file()


# The jobs of the chain assets' two-stage recipe with CPU jobs, and the steps each one runs.
CPU_CHAIN = {"prepare": ["prepare/teacher", "prepare/data"],
             "depth.importance": ["prepare/eval_teacher", "depth/importance", "depth/plan"],
             "depth.prune": ["depth/prune"],
             "depth": ["depth/eval_pruned", "depth/distill", "depth/eval", "width/importance", "width/plan"],
             "width.prune": ["width/prune"],
             "width": ["width/eval_pruned", "width/distill", "width/eval"],
             "final.export": ["final/export", "final/report"]}


@pytest.mark.slow
def test_chain_with_cpu_jobs_runs_the_recipe(slurm_env: dict[str, str], chain_assets: Path, tmp_path: Path) -> None:
    """`launch.sh --submit --chain --cpu-partition debug --wait`: the recipe's seven jobs, the CPU ones as one task,
    the GPU ones as the job's two tasks, each after the one before it; each job runs exactly its own steps and the
    run ends complete (exported student, report)."""
    from support.run_assets import recipe, write_recipe

    path = write_recipe(chain_assets, "cpu_chain", recipe(chain_assets))
    work, logs = tmp_path / "work", tmp_path / "logs"
    out = subprocess.run(
        ["bash", str(LAUNCH), "--submit", "--chain", "--wait", "--cpu-partition", "debug", "--cpu-time", "00:30:00",
         "--gpus-per-node", "0", "--tasks-per-node", "2", "--job-name", "cc", "--log-dir", str(logs), "--",
         "run", str(path), "--workdir", str(work), "--no-progress"],
        capture_output=True, text=True, env=slurm_env, cwd=tmp_path, timeout=2400)
    ids = dict(reversed(line.split()) for line in out.stdout.splitlines())

    def log(name: str, ext: str = "out") -> str:
        f = logs / f"cc-{name}-{ids.get(name)}.{ext}"
        return f.read_text() if f.is_file() else ""

    assert out.returncode == 0, (out.stdout, out.stderr, {n: log(n)[-2000:] + log(n, "err")[-2000:] for n in ids})
    assert list(ids) == list(CPU_CHAIN), out.stdout
    for name, steps in CPU_CHAIN.items():
        assert re.findall(r"\[run\] start (\S+)", log(name)) == steps, (name, log(name))
        tasks = 1 if name in ("prepare", "depth.prune", "width.prune", "final.export") else 2
        assert f"1 node(s) x {tasks} task(s)" in log(name, "err"), (name, log(name, "err"))
    state = json.loads((work / "state.json").read_text())["steps"]
    assert sorted(state) == sorted(step for steps in CPU_CHAIN.values() for step in steps), state
    assert all(entry["status"] == "done" for entry in state.values()), state
    assert (work / "export" / "hf" / "config.json").is_file() and (work / "report" / "report.md").is_file()


def test_chain_jobs_run_one_after_another(slurm_env: dict[str, str], tmp_path: Path) -> None:
    """The chain's mechanics on the cluster, with a stand-in for the interpreter that logs each stage's start and
    end: every job starts after the one before it ended, and --wait returns once all have completed."""
    work, logs = tmp_path / "work", tmp_path / "logs"
    out = subprocess.run(
        ["bash", str(LAUNCH), "--submit", "--chain", "--wait", "--stages", "one,two,three", "--requeue",
         "--python", str(SUPPORT / "slurm_stage_probe.sh"), "--gpus-per-node", "0", "--tasks-per-node", "1",
         "--job-name", "probe", "--log-dir", str(logs), "--", "run", "recipe.yaml", "--workdir", str(work)],
        capture_output=True, text=True, env=slurm_env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    ids = [line.split() for line in out.stdout.splitlines()]
    assert [stage for _, stage in ids] == ["one", "two", "three"] and all(i.isdigit() for i, _ in ids), out.stdout
    assert (work / "probe.log").read_text().splitlines() == [
        f"start one {ids[0][0]}", "end one", f"start two {ids[1][0]}", "end two", f"start three {ids[2][0]}",
        "end three"]
    for job_id, stage in ids:
        assert (logs / f"probe-{stage}-{job_id}.err").is_file()


def test_chain_stops_at_a_failed_stage(slurm_env: dict[str, str], tmp_path: Path) -> None:
    """A stage that fails cancels the stages after it (--kill-on-invalid-dep); --wait exits with its status."""
    _needs_run_command()
    from support.run_assets import STAGES, recipe, write_recipe

    # The stages can be listed, but the recipe cannot run: its teacher and data do not exist.
    path = write_recipe(tmp_path, "broken", recipe(tmp_path / "missing"))
    logs = tmp_path / "logs"
    proc = subprocess.Popen(
        ["bash", str(LAUNCH), "--submit", "--chain", "--wait", "--gpus-per-node", "0", "--tasks-per-node", "1",
         "--job-name", "broken", "--log-dir", str(logs), "--", "run", str(path), "--workdir", str(tmp_path / "w")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=slurm_env, cwd=tmp_path)
    ids: dict[str, str] = {}
    try:
        ids = _chain_job_ids(proc, STAGES)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if ids:
            subprocess.run(["scancel", *ids.values()], env=slurm_env, timeout=30)
    first = "".join(p.read_text() for p in sorted(logs.glob(f"broken-depth-{ids['depth']}.*")))
    assert proc.returncode == 2, (proc.returncode, stderr, first)  # megatron-slim's status for a bad recipe
    assert "teacher" in first and "does not exist" in first, first
    assert f"stage depth (job {ids['depth']}) failed with exit status 2" in stderr, stderr
    assert f"stage width (job {ids['width']}): not run, stage depth before it failed" in stderr, stderr
    assert not list(logs.glob(f"broken-width-{ids['width']}.*")), "the cancelled stage must not have run"


def test_local_torchrun_two_processes() -> None:
    out = subprocess.run(
        ["bash", str(LAUNCH), "--nproc-per-node", "2", "--python", sys.executable, "--exec", "--",
         sys.executable, str(SUPPORT / "slurm_allreduce.py")],
        capture_output=True, text=True, env=_clean_env(), timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = sorted(line for line in out.stdout.splitlines() if line.startswith("rank="))
    assert lines == ["rank=0 world=2 local_rank=0 sum=1", "rank=1 world=2 local_rank=1 sum=1"], out.stdout


def test_array_preprocess_shard_auto_merges_to_the_unsharded_dataset(slurm_env: dict[str, str],
                                                                      tmp_path: Path) -> None:
    """`preprocess --shard auto` in a 3-task array over one directory of parts: each task takes its shard from
    SLURM_ARRAY_TASK_ID/COUNT, and merge-datasets of the three shards is byte-identical to the unsharded dataset."""
    from megatron_slim.engines.preprocess_job import PreprocessJob, merge_datasets, run_preprocess

    (tmp_path / "corpus").mkdir()
    for i in range(4):
        docs = [[i * 100 + d * 10 + t for t in range(3 + d)] for d in range(2 + i)]
        (tmp_path / "corpus" / f"part-{i}.jsonl").write_text("".join(json.dumps({"tokens": d}) + "\n" for d in docs))
    script = ('exec "$1" -m megatron_slim.cli preprocess --input "$2/corpus" --output-prefix "$2/ds" '
              '--tokenizer none --vocab-size 1000 --eod-id 999 --shard auto --no-progress')
    logs = tmp_path / "logs"
    out = subprocess.run(
        ["bash", str(LAUNCH), "--submit", "--array", "3", "--cpu-partition", "debug", "--cpu-time", "00:10:00",
         "--job-name", "tok", "--log-dir", str(logs), "--wait", "--exec", "--", "bash", "-c", script, "task",
         sys.executable, str(tmp_path)],
        capture_output=True, text=True, env=slurm_env, cwd=REPO, timeout=300)
    logs_text = {p.name: p.read_text() for p in sorted(logs.glob("*"))} if logs.is_dir() else {}
    assert out.returncode == 0, (out.stdout, out.stderr, logs_text)
    shards = [str(tmp_path / f"ds-{i:05d}-of-00003") for i in range(3)]
    merge_datasets(shards, str(tmp_path / "merged"))
    run_preprocess(PreprocessJob(inputs=(str(tmp_path / "corpus"),), output_prefix=str(tmp_path / "whole"),
                                 tokenizer="none", vocab_size=1000, eod_id=999, progress=False))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"merged{ext}").read_bytes() == (tmp_path / f"whole{ext}").read_bytes()
