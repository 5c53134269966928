"""Output safety: one mechanism for every command that writes a checkpoint, a run directory or a result file.

`claim_output(out, inputs=..., overwrite=..., kind=...)` (a directory) and `claim_output_file(...)` (one file)
are context managers; the body writes into the staging path they yield, and the output appears only when the
body completes. Semantics:

1. Refused before anything is touched (nothing created, nothing removed), with a UserError:
   - `out` equal to, inside, or an ancestor of any input (paths resolved, symlinks followed);
   - `out` is a symlink, or is of the wrong type (an existing regular file where a directory is written, or a
     directory where a file is written);
   - `out` exists without `overwrite` (FileExistsError, as the commands always raised);
   - with `overwrite`, an existing `out` directory without our marker (below), such as a downloaded HF
     checkpoint: it may hold files we never wrote (README, onnx/), so it is never replaced.
2. An exclusive lock on the output, held for the whole write: `fcntl.flock` on the sibling `<out>.lock`, which
   records the holder's pid and host. A second writer fails at once (no waiting) with a UserError naming them.
   The kernel drops a flock when its process dies, so the lock is released on any exit (return, exception,
   SIGTERM, SIGKILL); the file itself is removed on a normal release, and a dead holder's left-over file is simply
   locked and rewritten by the next run (its inode is re-checked after locking, so a lock file removed under a
   waiting opener cannot give two holders). An existing `<out>.lock` that is not in our format is refused, never
   overwritten.
3. Staging: a directory output is built in `<out>.partial`, a file output in a fresh hidden temporary file beside
   it (`.<name>.XXXXXXXX.partial`; the lock holder first removes such files left by a killed earlier writer).
   Only the lock holder creates or removes `<out>.partial`, and it removes a pre-existing one only when that
   one carries our marker (a previous run of ours for this `out` that was killed: no-one else can be writing it,
   since we hold the lock) - with or without `overwrite`. A `<out>.partial` without the marker is someone else's
   data: refused, never deleted. A failed body (any exception) removes the staging it created.
4. Ours: every directory output gets the marker file `.megatron-slim-output` (JSON: {"kind": ..., "files":
   [the top-level entries the command wrote]}) before it is moved into place. `overwrite` replaces an existing
   directory only when it has the marker, and replaces only what the marker lists: any other entry (a README the
   user added since) is carried over into the new output, or, when the new output has an entry of that name, the
   whole overwrite is refused before anything moves. A single-file output is overwritten only with `overwrite`
   (it holds no marker; replacing one file cannot remove anything else).
5. Success: a file replaces `out` atomically (os.replace). A directory replacing an existing one: the old one is
   first renamed into a fresh hidden sibling `.<name>.replaced-*` (so nothing else can be clobbered), the staging
   directory renamed to `out`, then the old one removed; a crash between the renames leaves the old output whole
   in that sibling. The checks of 1 and 4 are repeated under the lock, as the paths may have changed meanwhile.
6. Modes: files and directories get the modes the umask gives any new file (temporary files are created 0600 by
   `tempfile`; they are widened to what `open()` would have made before they become the output).

Besides these one-shot outputs: `claim_workdir` (a run's or a study's work dir, which grows over many steps and
runs: marked when we create it, locked by one writer, cleared by `fresh` only when its marker names the command),
`atomic_write` (a file replaced whole, for the records a command keeps inside its own output: state.json, reports,
`latest`), and `Output`, the declaration of what a command writes, which the CLI checks before the command starts
(`preflight`) and after it succeeds (`postflight`; tests/test_outputs.py checks every registered command has one).
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
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_slim.errors import UserError

MARKER = ".megatron-slim-output"
PARTIAL, LOCK = ".partial", ".lock"
WORKDIR_LOCK = ".megatron-slim.lock"  # inside a work dir (its parent may not be ours to write)


def umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(path: Path) -> None:
    """Give `path` the mode a plain open()/mkdir() would have (mkstemp/mkdtemp create 0600/0700)."""
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask())


def sibling(out: Path, suffix: str) -> Path:
    return out.with_name(out.name + suffix)


def read_marker(path: Path) -> dict | None:
    """The marker of a directory this tool wrote, or None (no marker, or not one of ours)."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_ours(path: Path) -> bool:
    """A directory this tool wrote: it has our marker. Shape is not enough (a downloaded HF checkpoint has
    config.json and *.safetensors, and files we never wrote)."""
    return read_marker(path) is not None


def _write_marker(directory: Path, marker: dict) -> None:
    (directory / MARKER).write_text(json.dumps(marker) + "\n")


def check_not_inside(out: Path, inputs: Iterable[str | os.PathLike]) -> None:
    """`out` may be neither an input nor inside one (resolved, symlinks followed); it may contain one (a work dir
    holding its recipe)."""
    target = out.resolve()
    for given in inputs:
        inp = Path(given).resolve()
        if target == inp:
            raise UserError(f"output {out} is the input {given}: choose another output path")
        if inp in target.parents:
            raise UserError(f"output {out} lies inside the input {given}: choose a path outside it")


def check_not_overlapping(out: Path, inputs: Iterable[str | os.PathLike]) -> None:
    """`out` may be neither an input, nor inside one, nor contain one (all resolved, symlinks followed)."""
    inputs = list(inputs)
    check_not_inside(out, inputs)
    target = out.resolve()
    for given in inputs:
        inp = Path(given).resolve()
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
        raise UserError(f"refusing to overwrite {out}: it is not an output of megatron-slim (no {MARKER}; it may "
                        "hold files this command did not write); remove it yourself or choose another output")


@contextmanager
def output_lock(out: Path, path: Path | None = None) -> Iterator[Path]:
    """Hold the exclusive lock `path` (default `<out>.lock`; see the module docstring, 2) on `out`; fail at once
    if another process holds it."""
    path = sibling(out, LOCK) if path is None else path
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
    _write_marker(partial, {"kind": kind})


def _carried_over(staging: Path, out: Path) -> list[str]:
    """Entries of the existing output `out` that its marker does not list (the user's own files): they move into
    the new output. One the new output also has would be lost: refused."""
    if not out.exists():
        return []
    listed = read_marker(out).get("files")
    if listed is None:  # a marker of the previous version lists nothing: the whole directory was written by us
        return []
    extra = sorted(p.name for p in out.iterdir() if p.name != MARKER and p.name not in listed)
    clash = [name for name in extra if (staging / name).exists() or (staging / name).is_symlink()]
    if clash:
        raise UserError(f"refusing to overwrite {out}: it holds {clash}, which megatron-slim did not write and the "
                        "new output would replace; move them away first")
    return extra


def _replace_dir(staging: Path, out: Path) -> None:
    extra = _carried_over(staging, out)
    if not out.exists():
        staging.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
    out.rename(old / "old")
    staging.rename(out)
    for name in extra:
        (old / "old" / name).rename(out / name)
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
            files = sorted(p.name for p in partial.iterdir() if p.name != MARKER)
            _write_marker(partial, {"kind": kind, "files": files})  # in case the body replaced it
            _replace_dir(partial, out)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise


@contextmanager
def claim_output_file(out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (),
                      overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary path beside `out`, locked for this process; on success it atomically replaces
    `out`. Semantics in the module docstring."""
    out = Path(out)
    with _locked_target(out, inputs, directory=False, overwrite=overwrite):
        _remove_stale_staging_files(out)
        with _temporary_beside(out) as staging:
            yield staging


def _remove_stale_staging_files(out: Path) -> None:
    """Temporary files of a killed earlier writer of `out` (mkstemp's names: our prefix, 8 characters, our suffix).
    Called under `out`'s lock, so no live writer owns them."""
    pattern = re.compile(re.escape(f".{out.name}.") + r"[a-z0-9_]{8}" + re.escape(PARTIAL))
    for path in out.parent.iterdir():
        if pattern.fullmatch(path.name) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)


@contextmanager
def _temporary_beside(out: Path) -> Iterator[Path]:
    """A fresh hidden temporary file beside `out`, with the default mode; it replaces `out` atomically if the body
    completes, and is removed otherwise."""
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=PARTIAL, dir=out.parent)
    os.close(fd)
    staging = Path(name)
    try:
        default_mode(staging)
        yield staging
        os.replace(staging, out)
    finally:
        staging.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; it replaces `path` atomically (os.replace) when the body
    completes, so a reader, or a kill at any moment, sees the old file or the new one, never part of one. For the
    files a command keeps inside an output it already holds (state, reports, `latest`): no lock, no overwrite
    check. The one write-then-rename of this code base."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _temporary_beside(path) as staging:
        yield staging


def atomic_write(path: str | os.PathLike, data: str | bytes, *, fsync: bool = False) -> Path:
    """Replace `path` atomically with `data` (text is UTF-8); `fsync`: flush to disk before the rename."""
    with atomic_path(path) as staging:
        with open(staging, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    return Path(path)


# --- work dirs: directories that grow over many steps and runs ---------------------------------------------------

def prepare_workdir(workdir: str | os.PathLike, *, owner: str, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Make `workdir` usable: not an input nor inside one, a directory (created if missing). A directory we create
    (or find empty) gets our marker naming `owner` (the command), which is what lets `clear_workdir` remove its
    contents later; an existing directory of the user's is used as it is, and never marked."""
    workdir = Path(workdir)
    check_not_inside(workdir, inputs)
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"work dir {workdir} exists and is not a directory")
    workdir.mkdir(parents=True, exist_ok=True)
    if all(entry.name == WORKDIR_LOCK for entry in workdir.iterdir()):  # empty, or a killed holder's lock file
        atomic_write(workdir / MARKER, json.dumps({"kind": "workdir", "owner": owner}) + "\n")
    return workdir


def clear_workdir(workdir: str | os.PathLike, *, owner: str, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """`--fresh`: remove everything in `workdir`, under its lock, only when its marker says `owner` created it and
    no input lies in it; anything else is refused and left intact. A missing work dir is nothing to do."""
    workdir = Path(workdir)
    if not workdir.exists() and not workdir.is_symlink():
        return
    marker = read_marker(workdir) if workdir.is_dir() else None
    if marker is None or marker.get("kind") != "workdir" or marker.get("owner") != owner:
        made_by = f"was made by `{marker.get('owner')}`" if marker else f"has no {MARKER}"
        raise UserError(f"refusing to clear {workdir}: it {made_by}, not by `{owner}`, so it may hold files that "
                        "are not this command's; remove it yourself or choose another --workdir")
    check_not_overlapping(workdir, inputs)
    with workdir_lock(workdir):
        for entry in workdir.iterdir():
            if entry.name in (MARKER, WORKDIR_LOCK):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


@contextmanager
def workdir_lock(workdir: str | os.PathLike) -> Iterator[Path]:
    """One writer per work dir: the exclusive lock `<workdir>/.megatron-slim.lock` (pid and host inside), held for
    the body; a second holder fails at once naming the first (see output_lock)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with output_lock(workdir, workdir / WORKDIR_LOCK) as path:
        yield path


# --- what each command writes, declared and checked by the CLI ---------------------------------------------------

FORMS = ("dir", "file", "prefix", "workdir")


@dataclass(frozen=True)
class Output:
    """One output of a command: `dest`, the argparse attribute holding its path (None: not written this time);
    `form`: "dir" (a checkpoint directory, written through claim_output), "file" (claim_output_file), "prefix"
    (PREFIX.bin and PREFIX.idx) or "workdir" (prepare_workdir/workdir_lock); `inputs`: the attributes holding
    paths the command reads (a list attribute counts each entry); `overwrite`: the attribute of its --overwrite
    flag, if it has one; `paths`: for outputs named inside a config file rather than on the command line, a
    function of the parsed args giving (output, inputs)."""

    dest: str
    form: str
    inputs: tuple[str, ...] = ()
    overwrite: str | None = "overwrite"
    paths: Callable[[Any], tuple[str | None, list[str]]] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"Output form {self.form!r} is not one of {FORMS}")

    def resolve(self, args: Any) -> tuple[Path | None, list[str]]:
        """(the output path or None, the input paths) of this invocation."""
        if self.paths is not None:
            out, inputs = self.paths(args)
            return (None if out is None else Path(out)), [str(i) for i in inputs]
        out = getattr(args, self.dest, None)
        inputs: list[str] = []
        for name in self.inputs:
            value = getattr(args, name, None)
            inputs += [str(v) for v in value] if isinstance(value, (list, tuple)) else [] if value is None else [
                str(value)]
        return (None if out is None else Path(out)), inputs


def _existing_inputs(inputs: list[str]) -> list[str]:
    """Inputs that name a path here (`smollm2`, a hub id or a token count is not one)."""
    return [i for i in inputs if Path(i).exists() or Path(i).is_symlink()]


def preflight(outputs: Iterable[Output], args: Any) -> None:
    """Before a command starts: every declared output is checked against its inputs and what exists at it (the
    same refusals its writer makes under the lock, made before any compute)."""
    for spec in outputs:
        out, inputs = spec.resolve(args)
        if out is None:
            continue
        inputs = _existing_inputs(inputs)
        overwrite = bool(getattr(args, spec.overwrite, False)) if spec.overwrite else False
        if spec.form == "workdir":
            check_not_inside(out, inputs)
            if out.exists() and not out.is_dir():
                raise UserError(f"work dir {out} exists and is not a directory")
        elif spec.form == "prefix":
            for ext in (".bin", ".idx"):
                check_not_overlapping(Path(f"{out}{ext}"), inputs)
        else:
            check_not_overlapping(out, inputs)
            _check_target(out, directory=spec.form == "dir", overwrite=overwrite)


def postflight(outputs: Iterable[Output], args: Any) -> None:
    """After a command succeeded: each directory output it declared and wrote (a dry run writes none) carries our
    marker, i.e. was written through claim_output (a command that wrote one some other way is a bug, found by its
    first test)."""
    for spec in outputs:
        out, _ = spec.resolve(args)
        if out is not None and spec.form == "dir" and out.exists() and not (out / MARKER).is_file():
            raise RuntimeError(f"{out} was written without runtime.outputs.claim_output (no {MARKER})")
