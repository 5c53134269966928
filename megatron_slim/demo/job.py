"""The embedded default job (`DemoJob`, `run_demo`): assets built once into the cache, the demo recipe run like
any other, then the retention table and where the report and the student are."""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

DEMO_EXPERTS = 8
DEMO_TOPK = 8


@dataclass(frozen=True)
class DemoJob:
    """The `demo` command's flags, by the same names (progress: not --no-progress)."""

    workdir: Path
    fresh: bool = False  # remove the work dir first and run every step again
    progress: bool = True


def prepare_assets() -> Path:
    """Teacher, data splits and recipe in the cache (built once); returns the recipe's path."""
    from megatron_slim.data.assets import cache_dir
    from megatron_slim.data.wiki import wiki_splits, write_jsonl
    from megatron_slim.engines.upcycle import EMBEDDED_DENSE, UpcycleJob, run_upcycle

    root = cache_dir() / "demo"
    teacher = root / "teacher"
    if not (teacher / "config.json").is_file():
        print(f"building the teacher (once): SmolLM2-135M -> {DEMO_EXPERTS} experts, top-{DEMO_TOPK}", flush=True)
        tmp = root / "teacher.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        run_upcycle(UpcycleJob(dense=EMBEDDED_DENSE, experts=DEMO_EXPERTS, topk=DEMO_TOPK, out=tmp,
                               calib_tokens=16384, router_scale=1e-3, seed=0))
        tmp.rename(teacher)
    if not (root / "heldout.jsonl").is_file():
        splits = wiki_splits()
        for name in ("calibration", "train", "heldout"):
            write_jsonl(getattr(splits, name), root / f"{name}.jsonl.tmp").rename(root / f"{name}.jsonl")
    recipe = root / "recipe.yaml"
    template = (Path(__file__).parent / "recipe.yaml").read_text()
    if not recipe.is_file() or recipe.read_text() != template:
        recipe.write_text(template)
    return recipe


def run_demo(job: DemoJob) -> int:
    """Build the assets, run the demo recipe in `job.workdir` and print the retention table; the exit status."""
    from megatron_slim.run.job import RunJob, run_recipe
    from megatron_slim.run.recipe import load_recipe
    from megatron_slim.run.report import retention_table
    from megatron_slim.run.state import RunState

    workdir = job.workdir
    if job.fresh:
        shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.time()
    recipe_path = prepare_assets()
    t1 = time.time()
    code = run_recipe(RunJob(recipe=recipe_path, workdir=workdir, progress=job.progress))
    if code:
        return code
    recipe = load_recipe(recipe_path)
    state = RunState.read(workdir)
    print(f"\nassets {t1 - t0:.0f} s, run {time.time() - t1:.0f} s\n")
    print(retention_table(recipe, state))
    print(f"\nreport: {workdir / 'report' / 'report.md'}")
    print(f"student (HF): {state.outputs('final/export')['hf']}")
    return 0
