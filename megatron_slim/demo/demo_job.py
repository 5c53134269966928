"""The embedded default job (`DemoJob`, `run_demo`): assets built once into the cache, the demo recipe run like
any other, then the retention table and where the report and the student are."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from megatron_slim.runtime.config_loader import setting

DEMO_EXPERTS = 8
DEMO_TOPK = 8
# Calibration tokens for the teacher's neuron split and routers: 8,192 (twice the 4,096 the split's quality was
# measured on, compress/upcycle_ffn.py); 16,384 doubled the teacher build (the dense forward and the per-layer
# activations scale with it) for a split that the demo's top-8 teacher computes identically either way.
DEMO_CALIB_TOKENS = 8192


@dataclass(frozen=True)
class DemoJob:
    """The `demo` command's flags, by the same names (progress: not --no-progress)."""

    workdir: Path = setting(Path("runs/demo"), help="the run's work dir (outputs, state, report)")
    fresh: bool = setting(False, help="remove the work dir first and run every step again")
    progress: bool = setting(True, help="no progress bars")


def prepare_assets() -> Path:
    """Teacher, data splits and recipe in the cache (built once); returns the recipe's path."""
    from megatron_slim.data.assets import cache_dir
    from megatron_slim.runtime.outputs import atomic_write

    root = cache_dir() / "demo"
    upcycled_teacher(root / "teacher", DEMO_EXPERTS, DEMO_TOPK)
    prepare_data(root)
    recipe = root / "recipe.yaml"
    template = (Path(__file__).parent / "recipe.yaml").read_text()
    if not recipe.is_file() or recipe.read_text() != template:
        atomic_write(recipe, template)
    return recipe


def upcycled_teacher(teacher: Path, experts: int, topk: int) -> None:
    """SmolLM2-135M upcycled into a Mixtral-style MoE at `teacher` (built once; run_upcycle stages it)."""
    from megatron_slim.engines.upcycle_job import EMBEDDED_DENSE, UpcycleJob, run_upcycle

    if (teacher / "config.json").is_file():
        return
    print(f"building the teacher (once): SmolLM2-135M -> {experts} experts, top-{topk}", flush=True)
    run_upcycle(UpcycleJob(dense=EMBEDDED_DENSE, experts=experts, topk=topk, out=teacher,
                           calib_tokens=DEMO_CALIB_TOKENS, overwrite=True))


def prepare_data(root: Path) -> None:
    """The Wikipedia calibration, training and held-out paragraphs as jsonl files in `root` (written once)."""
    from megatron_slim.data.wiki import wiki_splits, write_jsonl
    from megatron_slim.runtime.outputs import atomic_path

    if not (root / "heldout.jsonl").is_file():
        splits = wiki_splits()
        for name in ("calibration", "train", "heldout"):
            with atomic_path(root / f"{name}.jsonl") as staging:
                write_jsonl(getattr(splits, name), staging)


def run_demo(job: DemoJob) -> int:
    """Build the assets, run the demo recipe in `job.workdir` and print the retention table; the exit status."""
    from megatron_slim.run.recipe_check import load_recipe
    from megatron_slim.run.recipe_job import RunJob, run_recipe
    from megatron_slim.run.report import retention_table
    from megatron_slim.run.state import RunState, RunView
    from megatron_slim.run.step_groups import EXPORT, Out
    from megatron_slim.runtime.outputs import clear_workdir, prepare_workdir

    workdir = job.workdir
    if job.fresh:  # only a work dir the demo made (its marker says so), never whatever --workdir names
        clear_workdir(workdir, owner="demo")
    prepare_workdir(workdir, owner="demo")
    t0 = time.time()
    recipe_path = prepare_assets()
    t1 = time.time()
    code = run_recipe(RunJob(recipe=recipe_path, workdir=workdir, progress=job.progress))
    if code:
        return code
    recipe = load_recipe(recipe_path)
    state = RunView(RunState.read(workdir))
    print(f"\nassets {t1 - t0:.0f} s, run {time.time() - t1:.0f} s\n")
    print(retention_table(recipe, state))
    print(f"\nreport: {workdir / 'report' / 'report.md'}")
    print(f"student (HF): {state.outputs(EXPORT)[Out.HF]}")
    return 0
