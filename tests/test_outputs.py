"""Output safety (issue #17, megatron_slim.runtime.outputs): locked, staged outputs that cannot be clobbered,
cannot delete an input or an unrelated directory, and never delete someone else's `X.partial`.

| bad input / fault                                               | test                                         |
|-----------------------------------------------------------------|----------------------------------------------|
| two runs into one output (a real second process holds the lock) | test_second_writer_fails_at_once_naming_...   |
| the holder is killed (SIGKILL)                                  | test_killed_holder_releases_the_lock          |
| out == input, out inside input, out ancestor of input, symlinks | test_output_overlapping_an_input_is_refused_  |
| --overwrite of a directory that is not ours                     | test_overwrite_of_an_unrelated_directory_...  |
| an unrelated pre-existing `X.partial`                           | test_unrelated_partial_is_never_deleted       |
| out is an existing regular file                                 | test_output_that_is_a_file_is_refused         |
| the body fails                                                  | test_failed_body_leaves_the_old_output_...    |
| an unrelated `X.lock`                                           | test_unrelated_lock_file_is_refused_intact    |
"""
from __future__ import annotations

import json
import os
import signal
import stat
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_slim.errors import UserError
from megatron_slim.runtime.outputs import MARKER, atomic_write, claim_output, claim_output_file

REPO = Path(__file__).resolve().parents[1]

# holds claim_output(out) with a file in its staging dir until a line arrives on stdin (or it is killed)
HOLDER = """
import sys
from pathlib import Path
from megatron_slim.runtime.outputs import claim_output
with claim_output(sys.argv[1]) as staging:
    (staging / "weights").write_text("first writer")
    print("ready", flush=True)
    sys.stdin.readline()
"""


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root: file contents, None for directories."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


@pytest.fixture
def holder(tmp_path):
    """Start a real second process that holds the lock on tmp_path/out; yields it once it is writing."""
    procs = []

    def start(out: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        procs.append(proc)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_second_writer_fails_at_once_naming_the_holder(tmp_path, holder):
    out = tmp_path / "out"
    first = holder(out)
    before = snapshot(tmp_path)
    started = time.monotonic()
    with pytest.raises(UserError) as e:
        with claim_output(out, overwrite=True):
            pytest.fail("the second writer got in")
    assert time.monotonic() - started < 2.0
    assert f"pid {first.pid} on host {socket.gethostname()}" in str(e.value)
    assert snapshot(tmp_path) == before  # the first writer's staging and lock untouched
    first.communicate("done\n")
    assert first.returncode == 0
    assert (out / "weights").read_text() == "first writer" and (out / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # lock and staging gone


def test_killed_holder_releases_the_lock(tmp_path, holder):
    out = tmp_path / "out"
    first = holder(out)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (tmp_path / "out.partial" / "weights").is_file()  # its stale staging is left behind...
    with claim_output(out) as staging:
        assert not (staging / "weights").exists()  # ...and removed by the next run, which holds the lock
        (staging / "weights").write_text("second writer")
    assert (out / "weights").read_text() == "second writer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("where", ["equal", "inside", "ancestor", "equal_via_symlink", "ancestor_via_symlink"])
def test_output_overlapping_an_input_is_refused_before_touching_anything(tmp_path, where):
    data = tmp_path / "data"
    model = data / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "w.safetensors").write_text("w")
    (data / "unrelated.txt").write_text("keep")
    (tmp_path / "link").symlink_to(data)
    out = {"equal": model, "inside": model / "sub", "ancestor": data, "equal_via_symlink": tmp_path / "link" /
           "model", "ancestor_via_symlink": tmp_path / "link"}[where]
    before = snapshot(tmp_path)
    for claim in (claim_output, claim_output_file):
        with pytest.raises(UserError, match="input"):
            with claim(out, inputs=[model], overwrite=True):
                pytest.fail("claimed")
    assert snapshot(tmp_path) == before


def test_overwrite_of_an_unrelated_directory_is_refused_and_it_stays_intact(tmp_path):
    out = tmp_path / "home"
    (out / "docs").mkdir(parents=True)
    (out / "docs" / "thesis.tex").write_text("years of work")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="not an output of megatron-slim"):
        with claim_output(out, overwrite=True):
            pytest.fail("claimed")
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_an_output_of_ours(tmp_path):
    out = tmp_path / "out"
    with claim_output(out, kind="hf") as staging:
        (staging / "config.json").write_text("old")
        (staging / "model.safetensors").write_text("old")
    with pytest.raises(FileExistsError):
        with claim_output(out):
            pytest.fail("claimed without overwrite")
    with claim_output(out, overwrite=True, kind="hf") as staging:
        (staging / "new").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "new"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("shape", ["hf", "megatron", "run"])
def test_overwrite_of_a_downloaded_checkpoint_is_refused_and_it_stays_intact(tmp_path, shape):
    """A checkpoint shaped like ours but without the marker (a hub download: README, onnx/) is never replaced:
    `--overwrite` used to delete its unrelated files."""
    out = tmp_path / "Qwen3-30B-A3B"
    (out / "onnx").mkdir(parents=True)
    (out / "onnx" / "model.onnx").write_text("exported")
    (out / "README.md").write_text("model card")
    files = {"megatron": ["model_config.json", ".metadata"], "hf": ["config.json", "model.safetensors"],
             "run": ["state.json"]}[shape]
    for name in files:
        (out / name).write_text("theirs")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="not an output of megatron-slim"):
        with claim_output(out, overwrite=True):
            pytest.fail("claimed")
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_only_what_the_marker_lists(tmp_path):
    """Files the user added to an output of ours since are carried over; one the new output would replace is
    refused before anything moves."""
    out = tmp_path / "out"
    with claim_output(out) as staging:
        (staging / "weights").write_text("v1")
    (out / "NOTES.md").write_text("mine")
    with claim_output(out, overwrite=True) as staging:
        (staging / "weights").write_text("v2")
    assert (out / "weights").read_text() == "v2" and (out / "NOTES.md").read_text() == "mine"
    assert json.loads((out / MARKER).read_text())["files"] == ["weights"]
    (out / "extra").write_text("mine too")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="extra"):
        with claim_output(out, overwrite=True) as staging:
            (staging / "extra").write_text("ours now")
    assert snapshot(tmp_path) == before


def test_outputs_get_the_umask_modes(tmp_path):
    """Files and directories as open()/mkdir() would make them (mkstemp used to leave outputs 0600)."""
    old = os.umask(0o022)
    try:
        with claim_output_file(tmp_path / "plan.json") as staging:
            staging.write_text("{}")
        with claim_output(tmp_path / "ckpt") as staging:
            (staging / "w").write_text("w")
        atomic_write(tmp_path / "state.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "plan.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "state.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "ckpt" / "w").stat().st_mode) == 0o644


@pytest.mark.parametrize("overwrite", [False, True])
def test_unrelated_partial_is_never_deleted(tmp_path, overwrite):
    """An `X.partial` without our marker is someone's data: refused, with or without --overwrite."""
    out = tmp_path / "X"
    (tmp_path / "X.partial").mkdir()
    (tmp_path / "X.partial" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="X.partial"):
        with claim_output(out, overwrite=overwrite):
            pytest.fail("claimed")
    assert snapshot(tmp_path) == before


def test_partial_is_not_touched_by_a_run_that_does_not_hold_the_lock(tmp_path, holder):
    out = tmp_path / "X"
    holder(out)
    (tmp_path / "X.partial" / "weights").write_text("being written")
    with pytest.raises(UserError, match="being written by another run"):
        with claim_output(out, overwrite=True):
            pytest.fail("claimed")
    assert (tmp_path / "X.partial" / "weights").read_text() == "being written"


def test_output_that_is_a_file_is_refused(tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="not a directory"):
        with claim_output(out, overwrite=True):
            pytest.fail("claimed")
    (tmp_path / "dir").mkdir()
    with pytest.raises(UserError, match="is a directory"):
        with claim_output_file(tmp_path / "dir", overwrite=True):
            pytest.fail("claimed")
    assert snapshot(tmp_path) == {**before, "dir": None}


def test_failed_body_leaves_the_old_output_and_no_staging(tmp_path):
    out = tmp_path / "out"
    with claim_output(out) as staging:
        (staging / "w").write_text("v1")
    with pytest.raises(RuntimeError):
        with claim_output(out, overwrite=True) as staging:
            (staging / "w").write_text("v2")
            raise RuntimeError("mid-write")
    assert (out / "w").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_file_output_is_replaced_atomically_only_with_overwrite(tmp_path):
    out = tmp_path / "plan.json"
    with claim_output_file(out) as staging:
        staging.write_text("v1")
    with pytest.raises(FileExistsError):
        with claim_output_file(out):
            pytest.fail("claimed without overwrite")
    with pytest.raises(RuntimeError):
        with claim_output_file(out, overwrite=True) as staging:
            staging.write_text("half")
            raise RuntimeError("mid-write")
    with claim_output_file(out, overwrite=True) as staging:
        staging.write_text("v2")
    assert out.read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_unrelated_lock_file_is_refused_intact(tmp_path):
    (tmp_path / "out.lock").write_text("my lock notes")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="not a megatron-slim lock file"):
        with claim_output(tmp_path / "out"):
            pytest.fail("claimed")
    assert snapshot(tmp_path) == before
