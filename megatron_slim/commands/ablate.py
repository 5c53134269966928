"""The SlimQwen paper's findings, measured (`make ablate`): each finding a set of recipe variants trained on the
same tokens and evaluated on the same held-out windows, run as one study so that shared steps run once.

Findings: init (pruned vs random init), criterion (expert frequency vs soft logits vs REAP), preserve (preserve
ratio 1.0 vs 0.5 vs 0.0), loss (KD only vs KD + LM vs LM only), mtp (a student with one fresh MTP depth trained on
plain MTP LM loss vs MTP KD; acceptance@1..k), schedule (one-shot vs depth first at equal tokens). By default on
the embedded teacher (SmolLM2-135M upcycled into 8 experts with top-6 routing, built once) and Wikipedia data; with
--base on a recipe of yours. Prints: finding, the paper's direction, the measured values ± standard error, and a
verdict (agrees / disagrees / inconclusive: a difference counts only when it exceeds twice its standard error).
With --seeds N every variant also trains with N-1 further seeds, and the standard errors include the spread
over seeds (training noise), not only over evaluation windows.
Writes <workdir>/report/{compare.md, findings.md, findings.json}. Rerunning resumes; adding findings later reuses
what is done.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from megatron_slim.runtime.outputs import Output

HELP = "measure the SlimQwen paper's findings as recipe variants (pruned vs random init, criteria, ...)"


OUTPUTS = (Output("workdir", "workdir", inputs=("base",), overwrite=None),)

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", default="paper", choices=["paper"], help="which set of findings (the paper's)")
    p.add_argument("--workdir", default="runs/ablate", help="the study's work dir (variants, shared steps, reports)")
    p.add_argument("--only", default="",
                   help="comma-separated findings to run (init, criterion, preserve, loss, mtp, schedule; "
                        "default: all)")
    p.add_argument("--base", help="run the findings as variants of this recipe (no variants of its own) instead of "
                   "the embedded one")
    p.add_argument("--seeds", type=int, default=1,
                   help="training seeds per variant (data order, fresh initialisation); N > 1 runs N times the "
                        "training and adds the seeds' spread to every standard error (default 1: window noise only)")
    p.add_argument("--json", action="store_true",
                   help='print {"findings": [{"name", "paper", "verdict", "variants": {NAME: {"loss", "loss_se", '
                        '"ppl", "accuracy", "seeds", "mtp_acceptance"}}}]} instead of the table')
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from megatron_slim.ablate.suite import AblateJob, run_ablation

    only = tuple(name.strip() for name in args.only.split(",") if name.strip())
    return run_ablation(AblateJob(workdir=Path(args.workdir), suite=args.suite, only=only,
                                  base=Path(args.base) if args.base else None, json=args.json,
                                  progress=not args.no_progress, seeds=args.seeds))
