"""The work dir's record of a run: which steps finished, when, and what they wrote (`<workdir>/state.json`).

A step is `done` only after its outputs are complete (every step writes through a temporary name or is itself
resumable), and only while they are all still there: a rerun skips done steps and redoes or resumes the rest,
including a finished step whose outputs were deleted since. Only rank 0 writes; the file is replaced
atomically, so a kill at any moment leaves the previous record.

Step outputs are numbers, paths, and lists of them; every string is a path. Paths inside the work dir are stored
relative to it (and handed out joined to the work dir as it was named this time), others as absolute paths, so a
run killed in one directory resumes from any other, and a work dir that is moved keeps working.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from megatron_slim.errors import UserError
from megatron_slim.runtime.outputs import atomic_write

STATE = "state.json"


def _read_state(path: Path) -> dict[str, Any]:
    """A state file's record, checked: a JSON object with a `steps` object of step records (a truncated or
    hand-edited file is one error naming it and what to do, not a traceback)."""
    fix = f"remove {path} (or the work dir) to start the run over"
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); {fix}") from None
    if not isinstance(data, dict) or not isinstance(data.get("steps"), dict) or \
            not all(isinstance(v, dict) for v in data["steps"].values()):
        raise UserError(f"{path}: not a run state (expected an object with a 'steps' object of step records); {fix}")
    return data


class RunState:
    def __init__(self, workdir: Path, recipe_digest: str) -> None:
        self.path = workdir / STATE
        self.data: dict[str, Any] = {"recipe": recipe_digest, "steps": {}}
        if self.path.is_file():
            self.data = _read_state(self.path)
            if self.data.get("recipe") != recipe_digest:
                raise UserError(f"{workdir} holds a run of a different recipe (digest {self.data.get('recipe')} vs "
                                f"{recipe_digest}); use another --workdir, or remove {self.path} to start over")

    @classmethod
    def read(cls, workdir: Path) -> "RunState":
        """The record as it is, for readers (export, reports) that do not run steps."""
        path = workdir / STATE
        if not path.is_file():
            raise UserError(f"{workdir} is not a megatron-slim run work dir (no {STATE})")
        state = cls.__new__(cls)
        state.path, state.data = path, _read_state(path)
        return state

    def status(self, step: str) -> str:
        return self.data["steps"].get(step, {}).get("status", "pending")

    def entries(self) -> dict[str, dict[str, Any]]:
        """Step id -> its record (status, seconds, attempts, outputs as stored)."""
        return dict(self.data["steps"])

    def done(self, step: str) -> bool:
        """Finished, and every path it recorded is still there (otherwise the step must run again)."""
        return self.status(step) == "done" and not self.missing(step)

    def missing(self, step: str) -> list[str]:
        """The outputs of a finished step that were there when it finished (`present`) and are gone now."""
        present = self.data["steps"].get(step, {}).get("present", [])
        return [p for p in present if not os.path.lexists(self.path.parent / p)]

    def outputs(self, step: str) -> dict[str, Any]:
        entry = self.data["steps"].get(step)
        if entry is None or entry.get("status") != "done":
            raise UserError(f"step {step} has not finished")
        return _map_paths(entry.get("outputs", {}), lambda p: str(self.path.parent / p))

    def start(self, step: str) -> None:
        entry = self.data["steps"].setdefault(step, {})
        entry.update(status="running", started=time.time(), attempts=entry.get("attempts", 0) + 1)
        entry.pop("error", None)
        self._write()

    def finish(self, step: str, outputs: dict[str, Any]) -> None:
        entry = self.data["steps"][step]
        now = time.time()
        workdir = self.path.parent.resolve()

        def stored(path: str) -> str:
            resolved = Path(path).resolve()
            return str(resolved.relative_to(workdir)) if resolved.is_relative_to(workdir) else str(resolved)

        stored_outputs = _map_paths(outputs, stored)
        entry.update(status="done", finished=now, outputs=stored_outputs, present=self._present(stored_outputs),
                     seconds=entry.get("seconds", 0.0) + now - entry["started"])
        self._write()

    def _present(self, outputs: dict[str, Any]) -> list[str]:
        """The paths among `outputs` (as stored) that exist now, an indexed-dataset prefix as its .bin and .idx:
        what `missing` checks later (an output that may legitimately be absent, such as a teacher without a
        tokenizer directory, is not among them)."""
        found: list[str] = []

        def note(path: str) -> str:
            full = self.path.parent / path
            if os.path.lexists(full):
                found.append(path)
            elif all(os.path.lexists(f"{full}{ext}") for ext in (".bin", ".idx")):
                found.extend([f"{path}.bin", f"{path}.idx"])
            return path

        _map_paths(outputs, note)
        return found

    def fail(self, step: str, error: str, status: str = "failed") -> None:
        entry = self.data["steps"][step]
        now = time.time()
        entry.update(status=status, error=error, seconds=entry.get("seconds", 0.0) + now - entry["started"])
        self._write()

    def _write(self) -> None:
        atomic_write(self.path, json.dumps(self.data, indent=1))


class RunView:
    """A variant's view of its run: its own steps' records, and the records of the steps it shares with other
    variants (`shared`: the variant's step id -> the record id in `shared_state`), under the variant's step ids."""

    def __init__(self, own: RunState, shared_state: RunState | None = None,
                 shared: dict[str, str] | None = None) -> None:
        self.own, self.shared_state, self.shared = own, shared_state, shared or {}

    def _where(self, step: str) -> tuple[RunState, str]:
        return (self.shared_state, self.shared[step]) if step in self.shared else (self.own, step)

    def status(self, step: str) -> str:
        state, record = self._where(step)
        return state.status(record)

    def done(self, step: str) -> bool:
        state, record = self._where(step)
        return state.done(record)

    def missing(self, step: str) -> list[str]:
        state, record = self._where(step)
        return state.missing(record)

    def outputs(self, step: str) -> dict[str, Any]:
        state, record = self._where(step)
        return state.outputs(record)

    def entries(self) -> dict[str, dict[str, Any]]:
        shared = {step: self.shared_state.entries()[record] for step, record in self.shared.items()
                  if record in self.shared_state.entries()}
        return shared | self.own.entries()


def _map_paths(value: Any, fn: Callable[[str], str]) -> Any:
    """`value` with `fn` applied to every string (path) inside it, numbers and structure unchanged."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_paths(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_paths(v, fn) for v in value]
    return value
