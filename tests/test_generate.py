"""Greedy generation (eval/generate.py): the generation cache (megatron-core's static KV cache, plus the conv and
recurrent states of Qwen3-Next's Gated DeltaNet layers: models/gdn.py) against a literal greedy loop of
transformers (no cache, one prompt at a time, PyTorch kernels) at DP2, EP2 and PP2 on converted Qwen3-MoE and
Qwen3-Next checkpoints; the cached and full-prefix paths agree on prompts of different lengths with stop
conditions, also for a student with an MTP depth (which generation must skip and restore); the layouts where the
cache cannot serve say why."""
from __future__ import annotations

import pytest
import torch

from support import tiny_models
from support.dist import run_distributed
from support.hf_checkpoints import build_tiny_hf

LENGTHS = (7, 1, 12, 4, 9)  # batches of 3 sorted longest first: the cache's prefill is the shortest of a batch
MAX_NEW = 10
LAYOUTS = {"dp2": {}, "ep2": {"ep": 2}, "pp2": {"pp": 2}}


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, tiny_models.VOCAB, (n,), generator=gen).tolist() for n in LENGTHS]


def stops(tokens: list[int]) -> bool:
    return bool(tokens) and tokens[-1] % 11 == 0  # some rows stop early, others run to MAX_NEW


FAMILIES = ("qwen3_moe", "qwen3_next")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, dict]:
    """Per family: the converted checkpoint and the literal greedy loop's continuations of `prompts()`."""
    from megatron_slim.checkpoint.convert import hf_to_mcore
    from megatron_slim.verify.hf_reference import load_hf_reference

    out = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(f"generate_{family}")
        build_tiny_hf(tiny_models.FAMILIES[family](), seed=2).save_pretrained(root / "hf")
        hf_to_mcore(root / "hf", root / "mcore", progress=False)
        model = load_hf_reference(root / "hf", dtype=torch.float32)  # transformers' PyTorch kernels, not fla's
        reference = []
        with torch.no_grad():
            for p in prompts():  # literal greedy loop: the whole prefix each step, nothing cached
                ids = list(p)
                for _ in range(MAX_NEW):
                    ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
                reference.append(ids[len(p):])
        out[family] = {"mcore": root / "mcore", "reference": reference}
    return out


def generation_sweep(rank: int, world: int, mcores: dict[str, str]) -> dict:
    """Every family's sweep, then `blockers`: one pair of ranks (one megatron-core import each) for the module."""
    out = {family: family_sweep(rank, mcore) for family, mcore in mcores.items()}
    out["blockers"] = blockers(rank, world)
    return out


def family_sweep(rank: int, mcore: str) -> dict:
    from megatron_slim.checkpoint.mcore import load_model, load_model_config
    from megatron_slim.eval.generate import greedy_continuation, kv_cache_blocker
    from megatron_slim.eval.harness import greedy_generate
    from megatron_slim.models.builder import build_model
    from megatron_slim.models.unwrap import unwrap_model
    from megatron_slim.runtime.distributed import init_model_parallel
    from megatron_slim.runtime.layout import ParallelLayout

    out = {}
    cfg = load_model_config(mcore)
    with_mtp = cfg.replace(mtp_num_layers=1)  # as `add-mtp` grows a student's MTP depth
    for name, layout in LAYOUTS.items():
        parallel = ParallelLayout(**layout)
        init_model_parallel(parallel, seed=100 + rank)
        model = build_model(cfg, parallel)
        load_model(model, mcore)
        model.eval()
        same = torch.tensor([prompts()[0][:6]] * 3)
        out[name] = {
            "blocker": kv_cache_blocker(model),
            "cached": greedy_generate(model, prompts(), MAX_NEW, lambda t: False, batch_size=3, micro_batch=2),
            "cached_stops": greedy_generate(model, prompts(), MAX_NEW, stops, batch_size=3, micro_batch=2),
            "full_stops": greedy_generate(model, prompts(), MAX_NEW, stops, batch_size=3, micro_batch=2,
                                          kv_cache=False),
            "continuation": greedy_continuation(model, same, MAX_NEW, micro_batch=2),
            "continuation_full": greedy_continuation(model, same, MAX_NEW, micro_batch=2, kv_cache=False)}
        student = build_model(with_mtp, parallel)  # random weights, one MTP depth
        student.eval()
        before = unwrap_model(student).mtp_process  # True on the last pipeline stage only
        out[name]["mtp_cached"] = greedy_generate(student, prompts(), MAX_NEW, stops, batch_size=3, micro_batch=1)
        out[name]["mtp_full"] = greedy_generate(student, prompts(), MAX_NEW, stops, batch_size=3, micro_batch=1,
                                                kv_cache=False)
        out[name]["mtp_process"] = [before, unwrap_model(student).mtp_process]
    return out


def blockers(rank: int, world: int) -> dict:
    from megatron_slim.eval.generate import kv_cache_blocker
    from megatron_slim.models.builder import build_model
    from megatron_slim.models.registry import model_config_from_hf
    from megatron_slim.runtime.distributed import init_model_parallel
    from megatron_slim.runtime.layout import ParallelLayout

    out = {}
    for name, layout in (("tp1", {}), ("tp2", {"tp": 2})):
        parallel = ParallelLayout(**layout)
        init_model_parallel(parallel, seed=1)
        out[name] = kv_cache_blocker(build_model(model_config_from_hf(tiny_models.qwen3_next()), parallel))
    return out


@pytest.fixture(scope="module")
def sweep(tiny) -> list[dict]:
    return run_distributed(generation_sweep, 2, {f: str(t["mcore"]) for f, t in tiny.items()}, timeout_s=600)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_cached_generation_matches_a_literal_transformers_loop(sweep, tiny, family, layout):
    reference = tiny[family]["reference"]
    assert len({tuple(r) for r in reference}) == len(LENGTHS)  # informative: every prompt differs
    for rank in sweep:
        assert rank[family][layout]["blocker"] is None, layout  # the cache served
        assert rank[family][layout]["cached"] == reference, layout


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_cached_and_full_prefix_paths_agree(sweep, family, layout):
    for rank in sweep:
        got = rank[family][layout]
        lengths = {len(t) for t in got["cached_stops"]}
        assert min(lengths) < MAX_NEW and MAX_NEW in lengths, lengths  # stops cut some rows, not all
        assert got["cached_stops"] == got["full_stops"], layout
        assert torch.equal(got["continuation"], got["continuation_full"]), layout
        assert got["continuation"].shape == (3, 6 + MAX_NEW)
        assert got["mtp_cached"] == got["mtp_full"], layout
        assert got["mtp_process"][0] == got["mtp_process"][1], layout  # skipped while generating, then restored
        assert len({tuple(t) for t in got["mtp_full"]}) > 1  # the random student is not degenerate
    assert any(rank[family][layout]["mtp_process"][0] for rank in sweep)


def test_layouts_the_cache_cannot_serve_say_why(sweep):
    got = sweep[0]["blockers"]
    assert got["tp1"] is None  # Gated DeltaNet layers carry their states in the generation context
    assert "sequence parallelism" in got["tp2"]
