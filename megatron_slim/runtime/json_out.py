"""The `--json` output of every command: exactly one valid JSON document on stdout, success or failure.

Python's `json.dumps` writes NaN and Infinity, which no JSON parser accepts: a model whose loss went NaN made
`evaluate --json` print an unparseable line with exit status 0. Here non-finite numbers become null and the
document lists where they were under "nonfinite" (JSON-pointer-like paths), so a consumer sees the value is
missing and why. A command that fails in JSON mode before printing its document prints {"error": ...} instead
(`cli.main` does that through `emitted`), so a script reading stdout always gets one document. The document may
come from a spawned rank: `watching()` names a marker file in the environment that `emit` creates in any process.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_MARK_ENV = "MEGATRON_SLIM_JSON_EMITTED"


def finite(obj: Any, path: str = "", found: list[str] | None = None) -> tuple[Any, list[str]]:
    """`obj` with every NaN/Inf float replaced by None, and the paths of those replaced."""
    found = [] if found is None else found
    if isinstance(obj, float) and not math.isfinite(obj):
        found.append(path or "/")
        return None, found
    if isinstance(obj, dict):
        return {k: finite(v, f"{path}/{k}", found)[0] for k, v in obj.items()}, found
    if isinstance(obj, (list, tuple)):
        return [finite(v, f"{path}/{i}", found)[0] for i, v in enumerate(obj)], found
    return obj, found


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON for `obj`; a dict with non-finite numbers gets them as null plus a "nonfinite" list of paths."""
    clean, found = finite(obj)
    if found and isinstance(clean, dict):
        clean["nonfinite"] = found
    return json.dumps(clean, allow_nan=False, **kwargs)


def emit(obj: Any) -> None:
    """Print `obj` as the command's one JSON document."""
    print(dumps(obj), flush=True)
    mark = os.environ.get(_MARK_ENV)
    if mark:
        open(mark, "w").close()


@contextmanager
def watching() -> Iterator[None]:
    """While active, `emitted()` tells whether this process or any child it starts has emitted the document."""
    fd, mark = tempfile.mkstemp(prefix="megatron-slim-json-")
    os.close(fd)
    os.unlink(mark)
    saved = os.environ.get(_MARK_ENV)
    os.environ[_MARK_ENV] = mark
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(_MARK_ENV, None)
        else:
            os.environ[_MARK_ENV] = saved
        if os.path.exists(mark):
            os.unlink(mark)


def emitted() -> bool:
    """Whether the document has been printed (inside `watching()`)."""
    mark = os.environ.get(_MARK_ENV)
    return bool(mark) and os.path.exists(mark)
