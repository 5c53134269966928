"""Shared test setup: make the `support` helpers importable (here and in spawned workers, which inherit sys.path),
keep torch to one thread per process (2-core machines)."""
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))
