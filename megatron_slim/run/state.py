"""The work dir's record of a run: which steps finished, when, and what they wrote (`<workdir>/state.json`).

A step is `done` only after its outputs are complete (every step writes through a temporary name or is itself
resumable), so a rerun skips done steps and redoes or resumes the rest. Only rank 0 writes; the file is replaced
atomically, so a kill at any moment leaves the previous record.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from megatron_slim.errors import UserError

STATE = "state.json"


class RunState:
    def __init__(self, workdir: Path, recipe_digest: str) -> None:
        self.path = workdir / STATE
        self.data: dict[str, Any] = {"recipe": recipe_digest, "steps": {}}
        if self.path.is_file():
            self.data = json.loads(self.path.read_text())
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
        state.path, state.data = path, json.loads(path.read_text())
        return state

    def status(self, step: str) -> str:
        return self.data["steps"].get(step, {}).get("status", "pending")

    def done(self, step: str) -> bool:
        return self.status(step) == "done"

    def outputs(self, step: str) -> dict[str, Any]:
        entry = self.data["steps"].get(step)
        if entry is None or entry.get("status") != "done":
            raise UserError(f"step {step} has not finished")
        return entry.get("outputs", {})

    def start(self, step: str) -> None:
        entry = self.data["steps"].setdefault(step, {})
        entry.update(status="running", started=time.time(), attempts=entry.get("attempts", 0) + 1)
        entry.pop("error", None)
        self._write()

    def finish(self, step: str, outputs: dict[str, Any]) -> None:
        entry = self.data["steps"][step]
        now = time.time()
        entry.update(status="done", finished=now, outputs=outputs,
                     seconds=entry.get("seconds", 0.0) + now - entry["started"])
        self._write()

    def fail(self, step: str, error: str, status: str = "failed") -> None:
        entry = self.data["steps"][step]
        now = time.time()
        entry.update(status=status, error=error, seconds=entry.get("seconds", 0.0) + now - entry["started"])
        self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(STATE + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)
