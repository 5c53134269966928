"""Step metrics: console, `metrics.jsonl` in the save dir, and wandb.

wandb: the run id is kept in `<save_dir>/wandb_id` and reused (resume="allow"), so a requeued or resumed job
continues the same wandb run instead of opening a new one. `wandb_mode: auto` logs online when the node reaches the
wandb service and offline otherwise (compute nodes often have no internet); offline runs are uploaded later with
`wandb sync <save_dir>/wandb/offline-run-*`, which the log says.
"""
from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

WANDB_ID = "wandb_id"


def wandb_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the wandb service (WANDB_BASE_URL, default api.wandb.ai) opens."""
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "api.wandb.ai", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def resolve_wandb_mode(mode: str) -> str:
    """`auto` -> online when the service is reachable from this node, else offline."""
    if mode != "auto":
        return mode
    return "online" if wandb_reachable() else "offline"


def wandb_run_id(save_dir: Path) -> str:
    """The save dir's wandb run id, created on first use."""
    path = save_dir / WANDB_ID
    if path.is_file():
        return path.read_text().strip()
    from megatron_slim.runtime.outputs import atomic_write

    run_id = uuid.uuid4().hex[:12]  # wandb run ids: lower-case letters and digits
    atomic_write(path, run_id + "\n")
    return run_id


class MetricsLogger:
    def __init__(self, save_dir: str | Path, run_name: str, config: dict, wandb_project: str = "",
                 wandb_mode: str = "auto") -> None:
        self.path = Path(save_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._wandb = None
        if wandb_project and wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            mode = resolve_wandb_mode(wandb_mode)
            run_id = wandb_run_id(self.path.parent)
            self._wandb = wandb.init(project=wandb_project, name=run_name, mode=mode, config=config,
                                     dir=str(self.path.parent), id=run_id, resume="allow")
            if mode == "offline":
                why = " (the wandb service is not reachable from this node)" if wandb_mode == "auto" else ""
                print(f"wandb run {run_id} logs offline{why}; upload it later with: wandb sync "
                      f"{self.path.parent / 'wandb'}/offline-run-*-{run_id}", flush=True)

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        parts = [f"step {record['step']:>6}"]
        for key in ("loss", "lm", "kd", "mtp_lm", "mtp_kd", "lr", "grad_norm", "tokens_per_s", "mfu"):
            if record.get(key) is not None:
                v = record[key]
                parts.append(f"{key} {v:.3e}" if key == "lr" else f"{key} {v:.4g}")
        if record.get("skipped"):
            parts.append("SKIPPED")
        print("  ".join(parts), flush=True)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
