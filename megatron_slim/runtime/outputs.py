"""Output safety: one mechanism for every command that writes a checkpoint, a run directory or a result file.

`claim_output(out, inputs=..., overwrite=..., kind=...)` (a directory) and `claim_output_file(...)` (one file)
are context managers; the body writes into the staging path they yield, and the output appears only when the
body completes. Semantics:

1. Refused before anything is touched (nothing created, nothing removed), with a UserError:
   - `out` equal to, inside, or an ancestor of any input (paths resolved, symlinks followed);
   - `out` is a symlink, or is of the wrong type (an existing regular file where a directory is written, or a
     directory where a file is written);
   - `out` exists without `overwrite` (FileExistsError, as the commands always raised);
   - with `overwrite`, an existing `out` directory that is not recognisably ours (below).
2. An exclusive lock on the output, held for the whole write: `fcntl.flock` on the sibling `<out>.lock`, which
   records the holder's pid and host. A second writer fails at once (no waiting) with a UserError naming them.
   The kernel drops a flock when its process dies, so the lock is released on any exit (return, exception,
   SIGTERM, SIGKILL); the file itself is removed on a normal release, and a dead holder's left-over file is simply
   locked and rewritten by the next run (its inode is re-checked after locking, so a lock file removed under a
   waiting opener cannot give two holders). An existing `<out>.lock` that is not in our format is refused, never
   overwritten.
3. Staging: a directory output is built in `<out>.partial`, a file output in a fresh hidden temporary file beside
   it (`.<name>.XXXXXXXX.partial`, created with the umask's permissions; the lock holder first removes such files
   left by a killed earlier writer of `out`). Only the lock holder creates or removes `<out>.partial`, and it
   removes a pre-existing one only when that one carries our marker (a previous run of ours for this `out` that
   was killed: no-one else can be writing it, since we hold the lock) - with or without `overwrite`. A
   `<out>.partial` without the marker is someone else's data: refused, never deleted. A failed body (any
   exception) removes the staging it created.
4. Ours: every directory output gets the marker file `.megatron-slim-output` (JSON: {"kind": ...}) before it
   is moved into place. `overwrite` replaces an existing directory only when it has the marker, or, for outputs of
   versions older than the marker, when it looks like one of ours: a Megatron checkpoint (`model_config.json` and
   `.metadata`), an HF checkpoint (`config.json` and at least one `*.safetensors`) or a run directory
   (`state.json`). Anything else is refused and left intact. A single-file output is overwritten only with
   `overwrite` (it holds no marker; replacing one file cannot remove anything else).
5. Success: a file replaces `out` atomically (os.replace). A directory replacing an existing one: the old one is
   first renamed into a fresh hidden sibling `.<name>.replaced-*` (so nothing else can be clobbered), the staging
   directory renamed to `out`, then the old one removed; a crash between the renames leaves the old output whole
   in that sibling. The checks of 1 and 4 are repeated under the lock, as the paths may have changed meanwhile.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from megatron_slim.errors import UserError

MARKER = ".megatron-slim-output"
PARTIAL, LOCK = ".partial", ".lock"


def sibling(out: Path, suffix: str) -> Path:
    return out.with_name(out.name + suffix)


def is_ours(path: Path) -> bool:
    """A directory this tool wrote: it has our marker, or it is shaped like an output of an older version."""
    if (path / MARKER).is_file():
        return True
    return (((path / "model_config.json").is_file() and (path / ".metadata").is_file())
            or ((path / "config.json").is_file() and any(path.glob("*.safetensors")))
            or (path / "state.json").is_file())


def check_not_overlapping(out: Path, inputs: Iterable[str | os.PathLike]) -> None:
    """`out` may be neither an input, nor inside one, nor contain one (all resolved, symlinks followed)."""
    target = out.resolve()
    for given in inputs:
        inp = Path(given).resolve()
        if target == inp:
            raise UserError(f"output {out} is the input {given}: choose another output path")
        if inp in target.parents:
            raise UserError(f"output {out} lies inside the input {given}: choose a path outside it")
        if target in inp.parents:
            raise UserError(f"output {out} contains the input {given}: replacing it would remove the input; "
                            "choose another output path")


def _check_target(out: Path, *, directory: bool, overwrite: bool) -> None:
    """Refusals about what already exists at `out` (see the module docstring, 1 and 4)."""
    if out.is_symlink():
        raise UserError(f"output {out} is a symbolic link: give the real path")
    if not out.exists():
        return
    if directory and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory")
    if not directory and out.is_dir():
        raise UserError(f"output {out} is a directory, not a file")
    if not overwrite:
        raise FileExistsError(f"{out} exists (use --overwrite to replace it)")
    if directory and not is_ours(out):
        raise UserError(f"refusing to overwrite {out}: it is not an output of megatron-slim (no {MARKER}, not a "
                        "Megatron/HF checkpoint or run directory); remove it yourself or choose another output")


@contextmanager
def output_lock(out: Path) -> Iterator[Path]:
    """Hold the exclusive lock `<out>.lock` (see the module docstring, 2); fail at once if another holds it."""
    path = sibling(out, LOCK)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise UserError(f"cannot use {path} as the lock of {out} ({e.strerror}): remove or rename it") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 256, 0).decode(errors="replace").split()
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            pid, host = (holder + ["unknown", "unknown"])[:2]
            raise UserError(f"{out} is being written by another run (pid {pid} on host {host}, lock {path}); wait "
                            "for it to finish or choose another output") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            content = os.pread(fd, 4096, 0).decode(errors="replace")
            if content and not re.fullmatch(r"\d+ \S+\n", content):
                os.close(fd)
                raise UserError(f"{path} exists and is not a megatron-slim lock file: remove or rename it yourself "
                                "(it is never overwritten)")
            break
        os.close(fd)  # the holder removed the file between our open and our lock: lock the current one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        os.unlink(path)
        os.close(fd)


def _take_partial(partial: Path, kind: str) -> None:
    """Create `<out>.partial` with our marker; a stale one of ours is removed first, anything else refused."""
    if partial.is_symlink() or partial.exists():
        if not (partial.is_dir() and not partial.is_symlink() and (partial / MARKER).is_file()):
            raise UserError(f"{partial} exists and is not a staging directory of megatron-slim: remove or rename "
                            "it yourself (it is never deleted automatically)")
        shutil.rmtree(partial)
    partial.mkdir()
    (partial / MARKER).write_text(json.dumps({"kind": kind}) + "\n")


def _replace_dir(staging: Path, out: Path) -> None:
    if not out.exists():
        staging.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
    out.rename(old / "old")
    staging.rename(out)
    shutil.rmtree(old)


@contextmanager
def _locked_target(out: Path, inputs: Iterable[str | os.PathLike], *, directory: bool,
                   overwrite: bool) -> Iterator[None]:
    """Check `out` before touching anything, lock it, and check again under the lock (another writer may have
    changed it in between)."""
    inputs = list(inputs)
    check_not_overlapping(out, inputs)
    _check_target(out, directory=directory, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        check_not_overlapping(out, inputs)
        _check_target(out, directory=directory, overwrite=overwrite)
        yield


@contextmanager
def claim_output(out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False,
                 kind: str = "checkpoint") -> Iterator[Path]:
    """Yield the staging directory `<out>.partial`, locked for this process; on success it becomes `out`,
    marked as ours with `kind`. Semantics in the module docstring."""
    out = Path(out)
    with _locked_target(out, inputs, directory=True, overwrite=overwrite):
        partial = sibling(out, PARTIAL)
        _take_partial(partial, kind)
        try:
            yield partial
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        (partial / MARKER).write_text(json.dumps({"kind": kind}) + "\n")  # in case the body replaced it
        _replace_dir(partial, out)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_stale_staging_files(out: Path) -> None:
    """Temporary files of a killed earlier writer of `out` (mkstemp's names: our prefix, 8 characters, our suffix).
    Called under `out`'s lock, so no live writer owns them."""
    pattern = re.compile(re.escape(f".{out.name}.") + r"[a-z0-9_]{8}" + re.escape(PARTIAL))
    for path in out.parent.iterdir():
        if pattern.fullmatch(path.name) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)


@contextmanager
def claim_output_file(out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (),
                      overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary path beside `out`, locked for this process; on success it atomically replaces
    `out`. Semantics in the module docstring."""
    out = Path(out)
    with _locked_target(out, inputs, directory=False, overwrite=overwrite):
        _remove_stale_staging_files(out)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=PARTIAL, dir=out.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the output from the rest of a cluster group
        os.close(fd)
        staging = Path(name)
        try:
            yield staging
            os.replace(staging, out)
        finally:
            staging.unlink(missing_ok=True)
