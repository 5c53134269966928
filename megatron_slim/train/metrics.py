"""Step metrics: console, `metrics.jsonl` in the save dir, and wandb (offline mode works without network)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsLogger:
    def __init__(self, save_dir: str | Path, run_name: str, config: dict, wandb_project: str = "",
                 wandb_mode: str = "offline") -> None:
        self.path = Path(save_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._wandb = None
        if wandb_project and wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(project=wandb_project, name=run_name, mode=wandb_mode, config=config,
                                     dir=str(self.path.parent), resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        parts = [f"step {record['step']:>6}"]
        for key in ("loss", "lm", "kd", "mtp_lm", "mtp_kd", "lr", "grad_norm", "tokens_per_s", "mfu"):
            if record.get(key) is not None:
                v = record[key]
                parts.append(f"{key} {v:.3e}" if key == "lr" else f"{key} {v:.4g}")
        print("  ".join(parts), flush=True)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
