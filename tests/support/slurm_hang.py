"""A rank of a job step that hangs the way a rank waiting on a dead peer does (a collective that never returns),
for the launch.sh test that a killed rank ends the job: writes DIR/pid-<rank> and then sleeps for an hour."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

out = Path(sys.argv[1])
(out / f"pid-{os.environ['SLURM_PROCID']}").write_text(str(os.getpid()))
time.sleep(3600)
