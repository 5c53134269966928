"""Reading the append-only JSON-lines logs the trainer writes (metrics.jsonl, eval.jsonl): one reader for the
trainer's resume, the report and the comparison, so that all of them treat a torn last line alike."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_slim.errors import UserError


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log (none when it does not exist). A last line without its newline is a write cut
    short by a kill and is left out; any other unreadable line is an error naming it."""
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")
    records = []
    for number, line in enumerate(lines[:-1], start=1):  # lines[-1] is "" or a torn write
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not a JSON record ({e})") from None
    return records
