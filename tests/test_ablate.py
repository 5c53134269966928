"""`megatron-slim ablate`: the verdict logic against hand-made evaluations, and `--only init` end to end on a tiny
teacher (through --base), printing the table and the JSON."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.run_assets import build, recipe as chain_recipe, write_recipe
from support.train_assets import cli

from megatron_slim.demo.ablate import FINDINGS, Finding, judge

BY_NAME = {f.name: f for f in FINDINGS}


def _ev(losses: list[float], acceptance: float = 0.0, positions: int = 1000) -> dict:
    return {"window_losses": losses, "mtp_acceptance": {"1": acceptance}, "mtp_positions": positions}


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
    proc = cli("ablate", "--only", "init", "--base", str(path), "--workdir", str(work), "--no-progress",
               timeout=1200)
    assert "| init | pruning the pre-trained teacher beats random initialisation by far |" in proc.stdout
    assert "frequency vs reap" in proc.stdout  # how differently the criteria rank the teacher's experts
    proc = cli("ablate", "--only", "init", "--base", str(path), "--workdir", str(work), "--json", "--no-progress")
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    [init] = found["findings"]
    assert init["name"] == "init" and init["verdict"] in ("agrees", "disagrees", "inconclusive")
    assert set(init["variants"]) == {"base", "random_init"}
    for row in init["variants"].values():
        assert {"loss", "loss_se", "ppl", "accuracy", "mtp_acceptance"} <= set(row) and row["loss_se"] > 0
    assert "skip  variant base: prepare/teacher (done, shared)" in proc.stdout  # the rerun did nothing again
    assert (work / "report" / "compare.md").is_file() and (work / "report" / "findings.md").is_file()
