"""The per-step metrics record: every loss part, lr, grad_norm, throughput, memory and the MoE load imbalance
(mean over MoE layers of max / mean tokens per expert), checked against a router whose answer is known."""
from __future__ import annotations

import math

import torch

from support import tiny_models
from support.hf_checkpoints import build_tiny_hf
from support.train_assets import assets, cli, convert, metrics, write_config  # noqa: F401  (assets is a fixture)

EXPERTS, TOPK = 8, 2  # tiny_models.qwen3_moe
COMMON = ("loss", "lm", "lr", "grad_norm", "tokens_per_s", "memory_gb", "moe_load_imbalance")


def _check_records(records: list[dict], keys: tuple[str, ...], steps: int) -> None:
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for r in records:
        missing = [k for k in keys if r.get(k) is None]
        assert not missing, (r["step"], missing, sorted(r))
        assert all(math.isfinite(r[k]) for k in keys), r
        assert r["tokens_per_s"] > 0 and r["memory_gb"] > 0 and r["grad_norm"] > 0
        # each token picks TOPK distinct experts: the busiest expert gets at most every token, i.e. EXPERTS/TOPK
        # times the mean; 1 means perfectly even
        assert 1.0 <= r["moe_load_imbalance"] <= EXPERTS / TOPK, r


def test_distillation_records_every_metric(assets):
    cli("train", "--config", str(write_config(assets, "metrics_kd", train={"train_iters": 4})))
    records = metrics(assets, "metrics_kd")
    _check_records(records, COMMON + ("kd",), 4)
    # random routers are neither perfectly even nor collapsed onto TOPK experts
    assert all(1.0 < r["moe_load_imbalance"] < EXPERTS / TOPK for r in records), records


def test_plain_training_records_every_metric_but_kd(assets):
    cli("train", "--config", str(write_config(assets, "metrics_plain", teacher=False, train={"train_iters": 2})))
    records = metrics(assets, "metrics_plain")
    _check_records(records, COMMON, 2)
    assert all("kd" not in r for r in records)


def test_collapsed_router_gives_experts_over_topk(assets):
    """All-zero router weights: every token's logits tie, so every token goes to the same TOPK experts and each
    layer's max / mean tokens per expert is exactly EXPERTS / TOPK at step 1 (before the first update)."""
    model = build_tiny_hf(tiny_models.qwen3_moe(num_hidden_layers=2), 1)
    gates = [p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")]
    assert len(gates) == 2
    with torch.no_grad():
        for p in gates:
            p.zero_()
    convert(model, assets, "collapsed")
    cfg = write_config(assets, "metrics_collapsed", teacher=False, model={"checkpoint": str(assets / "collapsed_mc")},
                       train={"train_iters": 2})
    cli("train", "--config", str(cfg))
    first = metrics(assets, "metrics_collapsed")[0]
    assert first["moe_load_imbalance"] == EXPERTS / TOPK, first
