"""Shared test setup: make the `support` helpers importable (here and in spawned workers, which inherit sys.path),
keep torch to one thread per process (2-core machines), and hand the longest files to the xdist workers first."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

# `make test` runs whole files on 2 xdist workers (--dist loadfile) in collection order (--no-loadscope-reorder):
# xdist's default order, most tests first, handed out files of a few minutes' processes (one-test ablate, add_mtp,
# train_guard) last, when one worker could be left alone with them. Longest first, the short files even out the
# end. The order: the longest files (fixtures and tests summed) of the CI's --durations report, longest first;
# every other file follows, the most tests first (ties by name).
LONGEST_FILES = (
    "test_run.py", "test_bad_inputs.py", "test_slurm_launch.py", "test_train.py", "test_variants.py",
    "test_outputs.py", "test_generate.py", "test_layouts.py", "test_ablate.py", "test_train_guard.py",
    "test_lm_eval.py", "test_importance.py", "test_safe_metadata.py", "test_surgery.py", "test_train_mtp_kd.py",
    "test_train_metrics.py", "test_backend_portable.py", "test_evaluate.py", "test_add_mtp.py",
)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the files as described above; the items of a file keep pytest's order (after its fixture-scope
    reordering, hence trylast)."""
    counts: dict[str, int] = {}
    for item in items:
        counts[item.path.name] = counts.get(item.path.name, 0) + 1
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}

    def key(item: pytest.Item) -> tuple[int, int, str]:
        name = item.path.name
        return (rank.get(name, len(rank)), -counts[name], str(item.path))

    items.sort(key=key)  # stable: a file's own order stays
