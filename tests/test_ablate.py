"""`megatron-slim ablate`: the verdict logic against hand-made evaluations (one and several training seeds), and
`--only init --seeds 2` end to end on a tiny teacher (through --base), printing the table and the JSON."""
from __future__ import annotations

import json
import math
import statistics
import tempfile
from pathlib import Path

import pytest

from megatron_slim.ablate.suite import FINDINGS, Finding, judge
from support.run_assets import build, recipe as chain_recipe, write_recipe
from support.train_assets import cli

BY_NAME = {f.name: f for f in FINDINGS}


def _ev(losses: list[float], acceptance: float = 0.0, positions: int = 1000) -> list[dict]:
    """One training seed's evaluation."""
    return [{"window_losses": losses, "mtp_acceptance": {"1": acceptance}, "mtp_positions": positions}]


def test_better_findings_need_every_difference_significant() -> None:
    f = BY_NAME["loss"]  # base beats kd_only and lm_only
    base = [3.0, 3.2, 2.9, 3.1]
    clearly_worse = [x + 0.5 + 0.01 * i for i, x in enumerate(base)]
    noisy = [x + d for x, d in zip(base, [0.3, -0.3, 0.2, -0.1])]
    assert judge(f, {"base": _ev(base), "kd_only": _ev(clearly_worse), "lm_only": _ev(clearly_worse)})[0] == "agrees"
    assert judge(f, {"base": _ev(base), "kd_only": _ev(clearly_worse), "lm_only": _ev(noisy)})[0] == "inconclusive"
    better = [x - 0.5 - 0.01 * i for i, x in enumerate(base)]
    verdict, evidence = judge(f, {"base": _ev(base), "kd_only": _ev(better), "lm_only": _ev(clearly_worse)})
    assert verdict == "disagrees" and "base - kd_only: +0.5" in evidence and "*" in evidence
    assert judge(f, {"base": _ev(base), "kd_only": _ev(base)})[0] == "not finished"


def test_same_findings_and_mtp_acceptance() -> None:
    f = BY_NAME["criterion"]
    base = [3.0, 3.2, 2.9, 3.1]
    noisy = [x + d for x, d in zip(base, [0.3, -0.3, 0.2, -0.1])]
    assert judge(f, {"base": _ev(base), "soft_logits": _ev(noisy), "reap": _ev(base)})[0] == "agrees"
    shifted = [x + 1.0 + 0.01 * i for i, x in enumerate(base)]
    assert judge(f, {"base": _ev(base), "soft_logits": _ev(noisy), "reap": _ev(shifted)})[0] == "disagrees"
    m = BY_NAME["mtp"]
    # 0.30 vs 0.20 over 1000 positions each: gap 0.10, SE sqrt(.21/1000 + .16/1000) = 0.019
    assert judge(m, {"mtp_kd": _ev([], 0.30), "mtp_lm": _ev([], 0.20)})[0] == "agrees"
    assert judge(m, {"mtp_kd": _ev([], 0.21), "mtp_lm": _ev([], 0.20)})[0] == "inconclusive"
    assert judge(m, {"mtp_kd": _ev([], 0.10), "mtp_lm": _ev([], 0.20)})[0] == "disagrees"
    assert isinstance(m, Finding)


def test_training_seeds_widen_the_noise_a_verdict_must_beat() -> None:
    """Two seeds per variant: on every window kd_only is worse by 0.5 +- 0.01 with seed 1, but by 0.05 with seed 2.
    Each seed alone is significant over windows; together the seeds' spread (SE 0.225) makes `base - kd_only`
    (-0.29) inconclusive, while lm_only, worse by 0.5 under both seeds, stays significant."""
    from megatron_slim.eval.stats import replicated_difference, replicated_mean

    f = BY_NAME["loss"]
    base = [3.0, 3.2, 2.9, 3.1]
    seed1 = [x + 0.5 + 0.01 * i for i, x in enumerate(base)]
    seed2 = [x + 0.05 + 0.01 * i for i, x in enumerate(base)]
    runs = {"base": _ev(base) + _ev(base), "kd_only": _ev(seed1) + _ev(seed2), "lm_only": _ev(seed1) + _ev(seed1)}
    verdict, evidence = judge(f, runs)
    assert verdict == "inconclusive" and "base - kd_only: -0.2900 ± 0.2251;" in evidence, evidence
    assert "base - lm_only: -0.5150 ± 0.0065 *" in evidence, evidence
    assert judge(f, {k: v[:1] for k, v in runs.items()})[0] == "agrees"  # one seed: window noise only
    # direct: window term over seed-averaged differences, seed term over the seeds' mean differences
    d = replicated_difference([base, base], [seed1, seed2])
    window_diffs = [-(0.275 + 0.01 * i) for i in range(4)]
    window_se = statistics.stdev(window_diffs) / 2
    seed_se = statistics.stdev([-0.515, -0.065]) / math.sqrt(2)
    assert (d.mean, d.se, d.n) == pytest.approx((statistics.fmean(window_diffs), math.hypot(window_se, seed_se), 4))
    mean, se = replicated_mean([seed1, seed2])
    avg = [(x + y) / 2 for x, y in zip(seed1, seed2)]
    want = math.hypot(statistics.stdev(avg) / 2, statistics.stdev([statistics.fmean(seed1), statistics.fmean(seed2)])
                      / math.sqrt(2))
    assert (mean, se) == pytest.approx((statistics.fmean(avg), want))
    m = BY_NAME["mtp"]  # the seeds' acceptance gaps (+0.10 and -0.10) add their spread to the binomial SE
    assert judge(m, {"mtp_kd": _ev([], 0.30) + _ev([], 0.10), "mtp_lm": _ev([], 0.20) * 2})[0] == "inconclusive"


def test_seed_replicates_are_variants_sharing_everything_but_training() -> None:
    import yaml

    from megatron_slim.ablate.suite import prepare_suite

    work = Path(tempfile.mkdtemp(prefix="ablate_seeds_"))
    base = work / "base.yaml"
    base.write_text(yaml.safe_dump({"name": "x", "teacher": "t", "data": {"train": "d.jsonl"},
                                    "training": {"train": {"seed": 7}}}))
    suite = yaml.safe_load(prepare_suite([BY_NAME["init"]], work / "study", base, seeds=3).read_text())
    assert list(suite["variants"]) == ["base", "base_seed2", "base_seed3", "random_init", "random_init_seed2",
                                       "random_init_seed3"]
    assert suite["variants"]["base"] == {} and suite["variants"]["base_seed3"] == {"training": {"train": {"seed": 9}}}
    assert suite["variants"]["random_init_seed2"] == {"init": "random", "training": {"train": {"seed": 8}}}


def test_unknown_finding_is_refused() -> None:
    proc = cli("ablate", "--only", "init,colour", "--workdir", "/nonexistent/never", check=False)
    assert proc.returncode == 2 and "no finding ['colour']" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ablate")
    build("chain", root)
    return root


def test_ablate_only_init_on_a_tiny_teacher(assets: Path) -> None:
    base = chain_recipe(assets, name="tiny-ablate", preset="one_shot", train_tokens=2 * 8 * 32,
                        evaluation={"tokens": 256, "mtp_k": 0, "every_tokens": 256})
    path = write_recipe(assets, "base", base)
    work = assets / "work"
    proc = cli("ablate", "--only", "init", "--seeds", "2", "--base", str(path), "--workdir", str(work),
               "--no-progress", timeout=1200)
    assert "| init | pruning the pre-trained teacher beats random initialisation by far |" in proc.stdout
    assert "frequency vs reap" in proc.stdout  # how differently the criteria rank the teacher's experts
    assert "SE over windows and 2 training seeds" in proc.stdout
    proc = cli("ablate", "--only", "init", "--seeds", "2", "--base", str(path), "--workdir", str(work), "--json",
               "--no-progress")
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    [init] = found["findings"]
    assert init["name"] == "init" and init["verdict"] in ("agrees", "disagrees", "inconclusive")
    assert set(init["variants"]) == {"base", "random_init"}
    for row in init["variants"].values():
        assert {"loss", "loss_se", "ppl", "accuracy", "mtp_acceptance"} <= set(row) and row["loss_se"] > 0
        assert row["seeds"] == 2
    assert "skip  variant base: prepare/teacher (done, shared)" in proc.stdout  # the rerun did nothing again
    compare = (work / "report" / "compare.md").read_text()
    assert "| base_seed2 |" in compare and "| random_init_seed2 |" in compare  # the replicates trained too
    assert (work / "report" / "findings.md").is_file()
