"""Output safety (issues #17, #28, megatron_slim.runtime.outputs): locked, staged outputs that cannot be clobbered,
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
| --overwrite of a downloaded checkpoint (README, onnx/)          | test_overwrite_of_a_downloaded_checkpoint_... |
| --overwrite of ours with the user's files added since           | test_overwrite_replaces_only_what_the_marker_ |
| outputs created 0600                                            | test_outputs_get_the_umask_modes              |
| a command that forgets the mechanism                            | test_every_command_declares_what_it_writes    |
| any command's output onto any of its inputs                     | test_every_command_refuses_an_output_that_... |
| upcycle --out onto its input or a downloaded checkpoint         | test_upcycle_never_writes_over_its_input_...  |
| demo --fresh --workdir onto a directory it did not make         | test_demo_fresh_never_clears_a_directory_...  |
| two trainers into one save dir                                  | test_second_trainer_into_a_save_dir_...       |
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_slim import cli
from megatron_slim.errors import UserError
from megatron_slim.runtime.outputs import (
    MARKER,
    atomic_write,
    claim_output,
    claim_output_file,
    clear_workdir,
    prepare_workdir,
)

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


# ---- every command: its outputs are declared, and the CLI refuses them before the command starts -------------------
WRITES = {"out", "output", "output_prefix", "workdir", "save", "save_dir", "plots"}  # dests that name an output


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Each registered command's parser (a command with sub-commands: each of those, as `command sub`)."""
    found = {}
    top = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in top.choices.items():
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subs:
            found |= {f"{name} {sub}": p for sub, p in subs[0].choices.items()}
        else:
            found[name] = parser
    return found


def _argv(parser: argparse.ArgumentParser, values: dict[str, str]) -> list[str]:
    """A command line giving `values` (dest -> value) and a placeholder for every other required argument."""
    argv: list[str] = []
    given = set()
    required = [a for a in parser._actions if a.required or a.dest in values]
    for group in parser._mutually_exclusive_groups:
        if group.required and not any(a.dest in values for a in group._group_actions):
            required.append(group._group_actions[0])
    for action in required:
        if action.dest in given or isinstance(action, argparse._HelpAction):
            continue
        given.add(action.dest)
        value = values.get(action.dest, action.choices[0] if action.choices else "1")
        argv += [action.option_strings[0], value] if action.option_strings else [value]
    return argv


def test_every_command_declares_what_it_writes():
    """A new command cannot forget the mechanism: the CLI refuses one without OUTPUTS, each declared output names
    a real argument, and a command that declares none has no argument naming an output."""
    parsers = _parsers()
    assert set(cli.COMMANDS) <= {name.split()[0] for name in parsers}
    for name in cli.COMMANDS:
        outputs = cli.command_outputs(name)
        dests = {a.dest for key, p in parsers.items() if key.split()[0] == name for a in p._actions}
        for spec in outputs:
            assert spec.dest in dests, (name, spec.dest)
            assert set(spec.inputs) <= dests, (name, spec.inputs)
        undeclared = (dests & WRITES) - {spec.dest for spec in outputs}
        assert not undeclared, f"{name} writes {undeclared} without declaring it in OUTPUTS"


def _cases():
    for key, parser in _parsers().items():
        for spec in cli.command_outputs(key.split()[0]):
            dests = {a.dest for a in parser._actions}
            if spec.dest in dests and spec.paths is None:
                for inp in spec.inputs:
                    if inp in dests:
                        yield pytest.param(key, spec, inp, id=f"{key}:{spec.dest}={inp}")


@pytest.mark.parametrize("command, spec, input_dest", list(_cases()))
def test_every_command_refuses_an_output_that_is_its_input(tmp_path, capsys, command, spec, input_dest):
    """For every registered command, every declared output onto each of its inputs (with --overwrite where the
    command has it): one error line, exit 2, the input untouched, before the command does anything."""
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors", "README.md"):
        (model / name).write_text("theirs")
    inp = model if spec.form in ("dir", "workdir") else model / "config.json"
    out = str(inp)
    if spec.form == "prefix":
        inp, out = model / "corpus.bin", str(model / "corpus")
        inp.write_text("corpus")
    parser = _parsers()[command]
    values = {spec.dest: out, input_dest: str(inp)}
    flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    argv = command.split() + _argv(parser, values) + ([flags[spec.overwrite]] if spec.overwrite in flags else [])
    before = snapshot(tmp_path)
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and f"is the input {inp}" in err, err
    assert snapshot(tmp_path) == before


def test_train_refuses_a_save_dir_inside_its_model(tmp_path, capsys):
    model = tmp_path / "student"
    model.mkdir()
    (model / "config.json").write_text("{}")
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{checkpoint: {model}}}\ncheckpoint: {{save_dir: {model / 'ckpt'}}}\n")
    before = snapshot(tmp_path)
    assert cli.main(["train", "--config", str(config)]) == 2
    assert "lies inside the input" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("out", ["dense", "downloaded"])
def test_upcycle_never_writes_over_its_input_or_a_downloaded_checkpoint(tmp_path, capsys, out):
    """`upcycle --dense D --out D` used to rewrite the dense input in place (rc 0), and `--out` onto an existing HF
    checkpoint replaced its weights, config and tokenizer, leaving a mixed directory; both refused, intact."""
    for name in ("dense", "downloaded"):
        (tmp_path / name).mkdir()
        for f in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
            (tmp_path / name / f).write_text(f"{name} {f}")
    before = snapshot(tmp_path)
    for overwrite in ([], ["--overwrite"]):
        code = cli.main(["upcycle", "--dense", str(tmp_path / "dense"), "--experts", "2", "--topk", "2", "--out",
                         str(tmp_path / out), *overwrite])
        assert code == 2
        err = capsys.readouterr().err
        assert ("is the input" if out == "dense" else "exists" if not overwrite else "not an output") in err, err
    assert snapshot(tmp_path) == before


def test_demo_fresh_never_clears_a_directory_it_did_not_make(tmp_path, capsys):
    """`demo --fresh --workdir P` used to delete P and everything in it; now P must carry the demo's marker (the
    same for `run --fresh`: tests/test_run.py)."""
    victim = tmp_path / "home"
    (victim / "docs").mkdir(parents=True)
    (victim / "docs" / "thesis.tex").write_text("years of work")
    before = snapshot(tmp_path)
    assert cli.main(["demo", "--workdir", str(victim), "--fresh"]) == 2
    assert "refusing to clear" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_clear_workdir_clears_only_its_owners_workdir(tmp_path):
    work = prepare_workdir(tmp_path / "work", owner="run")
    (work / "state.json").write_text("{}")
    (work / "teacher").mkdir()
    with pytest.raises(UserError, match="made by `run`, not by `demo`"):
        clear_workdir(work, owner="demo")
    recipe = work / "recipe.yaml"
    recipe.write_text("name: mine")
    with pytest.raises(UserError, match="contains the input"):
        clear_workdir(work, owner="run", inputs=[recipe])
    assert sorted(p.name for p in work.iterdir()) == sorted([MARKER, "recipe.yaml", "state.json", "teacher"])
    recipe.unlink()
    clear_workdir(work, owner="run")
    assert [p.name for p in work.iterdir()] == [MARKER]
    user = tmp_path / "mine"
    (user / "data").mkdir(parents=True)
    prepare_workdir(user, owner="run")  # used as it is, never marked: --fresh will not clear it
    assert not (user / MARKER).exists()


HOLD_WORKDIR = """
import sys
from megatron_slim.runtime.outputs import workdir_lock
with workdir_lock(sys.argv[1]):
    print("ready", flush=True)
    sys.stdin.readline()
"""


def test_second_trainer_into_a_save_dir_refuses_naming_the_holder(tmp_path, capsys):
    """One trainer per save dir (a plain `train` holds it; ranks launched by torchrun/srun are one trainer)."""
    save = tmp_path / "save"
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{checkpoint: {tmp_path / 'student'}}}\ndata: {{blend: [[1.0, {tmp_path / 'train'}]]}}\n"
                      f"loss: {{kd_weight: 0.0}}\ntrain: {{train_iters: 1}}\ncheckpoint: {{save_dir: {save}}}\n")
    first = subprocess.Popen([sys.executable, "-c", HOLD_WORKDIR, str(save)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert first.stdout.readline().strip() == "ready"
        before = snapshot(tmp_path)
        assert cli.main(["train", "--config", str(config)]) == 2
        assert f"pid {first.pid} on host {socket.gethostname()}" in capsys.readouterr().err
        after = snapshot(tmp_path)
        assert {k: after[k] for k in before} == before and set(after) - set(before) <= {f"save/{MARKER}"}
    finally:
        first.kill()
        first.wait()
