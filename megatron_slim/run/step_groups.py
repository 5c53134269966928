"""Names of the step groups around a run's stages (a step id is `<group>/<name>`): shared by the steps, the runner
and the report, which reads finished steps by id."""
from __future__ import annotations

PREPARE = "prepare"
FINAL = "final"
