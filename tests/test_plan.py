"""`plan`: parameter accounting equals real models (transformers and Megatron-Core), the paper's model sizes come
out, plans are deterministic and honour every constraint, and bad targets fail early with clear errors."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from megatron_slim.cli import main as cli_main
from megatron_slim.compress.accounting import COMPONENTS, account
from megatron_slim.compress.importance_file import Importance, layer_prefix
from megatron_slim.compress.plan import CompressionPlan
from megatron_slim.compress.planner import ImportanceError, make_plan, plan_expert_slots
from megatron_slim.compress.target import TargetError, TargetSpec
from megatron_slim.models.config import ATTENTION, GDN, MOE, ModelConfig
from megatron_slim.models.registry import hf_config_from, model_config_from_hf
from megatron_slim.verify.hf_reference import select_torch_kernels
from support import tiny_models
from support.dist import run_distributed
from support.hf_checkpoints import build_tiny_hf, random_mtp_tensors
from support.workers import parameter_numels

EXAMPLES = Path(__file__).parent.parent / "examples" / "slimqwen"
NEXT8 = dict(num_hidden_layers=8, layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 2)


def tiny(family: str, mtp: int = 0, **over) -> ModelConfig:
    return model_config_from_hf(tiny_models.FAMILIES[family](**over), mtp_num_layers=mtp)


def synthetic_importance(cfg: ModelConfig, seed: int = 0) -> Importance:
    """Random statistics with the importance file's names and shapes (see importance_file.py)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=gen)

    t = {"hidden.channels": rand(cfg.hidden_size)}
    blocks = [(layer_prefix(i), m, f) for i, (m, f) in enumerate(zip(cfg.mixer_types, cfg.mlp_types))]
    blocks += [(layer_prefix(mtp_depth=d), ATTENTION, MOE) for d in range(cfg.mtp_num_layers)]
    for p, mixer, mlp in blocks:
        if p.startswith("layers."):
            t[p + "block_influence"] = rand(1)
        if mixer == ATTENTION:
            heads = rand(cfg.num_attention_heads)
            t[p + "attention.heads"] = heads
            t[p + "attention.query_groups"] = heads.view(cfg.num_query_groups, -1).sum(1)
        else:
            t[p + "gdn.heads"] = rand(cfg.linear_num_value_heads)
        if mlp == MOE:
            e = cfg.num_experts
            for name in ("frequency", "soft_logits", "reap"):
                t[f"{p}experts.{name}"] = rand(e)
            co = rand(e, e)
            t[p + "experts.coactivation"] = (co + co.T) / 2
            cos = rand(e, e) * 2 - 1
            t[p + "experts.router_cosine"] = ((cos + cos.T) / 2).fill_diagonal_(1.0)
            t[p + "experts.neurons"] = rand(e, cfg.moe_ffn_hidden_size)
            if cfg.shared_expert_ffn_hidden_size:
                t[p + "shared_expert.neurons"] = rand(cfg.shared_expert_ffn_hidden_size)
        else:
            t[p + "dense_mlp.neurons"] = rand(cfg.dense_ffn_hidden_size)
    return Importance(cfg, t, tokens=1000, data="synthetic")


STUDENT = TargetSpec(num_layers=4, hidden_size=48, num_experts=6, topk=2, moe_ffn_hidden_size=16,
                     shared_expert_ffn_hidden_size=32, query_groups=1, gdn_key_heads=1)


def student_plan(**spec_changes) -> CompressionPlan:
    src = tiny("qwen3_next", mtp=1, **NEXT8)
    return make_plan(synthetic_importance(src), dataclasses.replace(STUDENT, **spec_changes))


# ---- accounting vs real models -------------------------------------------------------------------------------

def hf_component(name: str) -> str:
    if name.startswith("mtp."):
        return "mtp"
    if "embed_tokens" in name:
        return "embeddings"
    if name.startswith("lm_head"):
        return "output_head"
    if "norm" in name:
        return "norms"
    if ".self_attn." in name:
        return "attention"
    if ".linear_attn." in name:
        return "gdn"
    if ".mlp.shared_expert" in name:
        return "shared_experts"
    if ".mlp.experts." in name:
        return "routed_experts"
    if ".mlp.gate." in name:
        return "router"
    assert ".mlp." in name, name
    return "dense_mlp"


def mcore_component(name: str) -> str:
    if name.startswith("mtp."):
        return "mtp"
    if name.startswith("embedding."):
        return "embeddings"
    if name.startswith("output_layer"):
        return "output_head"
    if "norm" in name:
        return "norms"
    for part, comp in ((".mlp.router.", "router"), (".mlp.experts.", "routed_experts"),
                       (".mlp.shared_experts.", "shared_experts"), (".mlp.", "dense_mlp"),
                       (".self_attention.linear_", "attention"), (".self_attention.", "gdn")):
        if part in name:
            return comp
    raise AssertionError(name)


def by_component(numels: dict[str, int], classify) -> dict[str, int]:
    out = dict.fromkeys(COMPONENTS, 0)
    for name, n in numels.items():
        out[classify(name)] += n
    return out


def expected_totals(cfg: ModelConfig) -> dict[str, int]:
    return {k: c.total for k, c in account(cfg).components.items()}


ACCOUNTING_CASES = {
    "qwen3_moe_dense_layer": lambda: tiny("qwen3_moe", mlp_only_layers=[0, 2]),
    "qwen3_moe_tied": lambda: tiny("qwen3_moe", tie_word_embeddings=True),
    "qwen3_next_mtp": lambda: tiny("qwen3_next", mtp=1),
    "mixtral": lambda: tiny("mixtral"),
    "student_of_qwen3_next": lambda: student_plan().target,
}


@pytest.mark.parametrize("case", sorted(ACCOUNTING_CASES))
def test_accounting_equals_transformers_parameters(case):
    cfg = ACCOUNTING_CASES[case]()
    model = build_tiny_hf(hf_config_from(cfg), seed=0)
    numels = {n: p.numel() for n, p in model.named_parameters()}  # tied weights are listed once
    if cfg.mtp_num_layers:  # transformers drops Qwen3-Next's mtp.* tensors: count the on-disk layout's shapes
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        numels |= {k: v.numel() for k, v in random_mtp_tensors(model, shapes, 0, cfg.mtp_num_layers).items()}
    assert by_component(numels, hf_component) == expected_totals(cfg)
    assert sum(numels.values()) == account(cfg).total


def test_accounting_equals_megatron_parameters():
    configs = {name: make() for name, make in ACCOUNTING_CASES.items()}
    (numels,) = run_distributed(parameter_numels, 1, configs)
    for name, cfg in configs.items():
        assert by_component(numels[name], mcore_component) == expected_totals(cfg), name


@pytest.mark.parametrize("case", ["qwen3_moe_dense_layer", "qwen3_next_mtp", "mixtral"])
def test_active_equals_parameters_one_token_touches(case):
    """Backward from one token's logits: routed experts count only where their gradient slice is non-zero, the
    embedding only for non-zero rows, every other tensor the forward used counts whole."""
    cfg = ACCOUNTING_CASES[case]()
    model = select_torch_kernels(build_tiny_hf(hf_config_from(cfg), seed=0))
    model(torch.tensor([[5]])).logits.sum().backward()
    touched = dict.fromkeys(COMPONENTS, 0)
    for name, p in model.named_parameters():
        comp = hf_component(name)
        if p.grad is None:
            continue
        if comp == "routed_experts":
            used = int((p.grad.flatten(1).abs().sum(1) > 0).sum())
            touched[comp] += used * p[0].numel()
        elif comp == "embeddings":
            touched[comp] += int((p.grad.abs().sum(1) > 0).sum()) * p.shape[1]
        else:
            touched[comp] += p.numel()
    acc = account(cfg)
    assert touched == {k: (0 if k == "mtp" else c.active) for k, c in acc.components.items()}
    assert sum(touched.values()) == acc.active


def test_paper_teacher_and_student_sizes():
    teacher = model_config_from_hf(EXAMPLES / "teacher_config.json", mtp_num_layers=1)
    assert (teacher.num_layers, teacher.mixer_types.count(ATTENTION), teacher.num_experts) == (48, 12, 512)
    spec = TargetSpec.from_yaml(EXAMPLES / "target.yaml")
    spec.validate(teacher)
    student = spec.target_config(teacher, spec.placeholder_layers(teacher))
    assert (student.num_layers, student.mixer_types.count(ATTENTION), student.hidden_size,
            student.num_experts, student.topk) == (36, 9, 1536, 256, 8)
    t, s = account(teacher), account(student)
    assert abs(t.total / 80e9 - 1) < 0.1, t.total  # "80B": 81.3B with the MTP layer
    assert abs(account(teacher.replace(mtp_num_layers=0)).total / 80e9 - 1) < 0.1
    assert abs(s.total / 23e9 - 1) < 0.1, s.total  # "23B": 23.8B with MTP
    # "A3B" / "A2B": active parameters per token without embedding row and output head, to whole billions
    assert round(t.active_non_embedding / 1e9) == 3, t.active_non_embedding
    assert round(s.active_non_embedding / 1e9) == 2, s.active_non_embedding
    assert t.checkpoint_bytes(2) == 2 * t.total and s.checkpoint_bytes(4) == 4 * s.total


# ---- planning -----------------------------------------------------------------------------------------------

SCORES = [0.1, 0.8, 0.3, 0.9, 0.05, 0.5, 0.3, 0.2]  # rank: 3, 1, 5, 2, 6 (tie with 2: higher index later), 7, 0, 4


def similarity() -> torch.Tensor:
    sim = torch.zeros(8, 8)
    for e, (to5, to2) in {6: (0.1, 0.7), 7: (0.6, 0.2), 0: (0.4, 0.4), 4: (0.9, -0.3)}.items():
        sim[e, 5], sim[e, 2] = to5, to2
    sim[4, 3] = 0.95  # 4 is closest to 3, which only becomes a base when it is not kept intact (p=0)
    return sim


def test_partial_preservation_by_hand():
    slots = plan_expert_slots(SCORES, similarity(), n_slots=4, preserve_ratio=0.5)
    # intact: 3, 1; bases: 5, 2; 6 -> 2, 7 -> 5, 0 -> 2 (tie: lower base index), 4 -> 5
    expected = [[(1, 1.0)], [(2, 0.3 / 0.7), (0, 0.1 / 0.7), (6, 0.3 / 0.7)], [(3, 1.0)],
                [(5, 0.5 / 0.75), (4, 0.05 / 0.75), (7, 0.2 / 0.75)]]
    assert [[e for e, _ in s] for s in slots] == [[e for e, _ in s] for s in expected]
    for got, want in zip(slots, expected):
        assert [w for _, w in got] == pytest.approx([w for _, w in want], abs=1e-12)


def test_preserve_ratio_edges_and_rounding():
    assert plan_expert_slots(SCORES, None, 4, 1.0) == [[(1, 1.0)], [(2, 1.0)], [(3, 1.0)], [(5, 1.0)]]
    all_bases = plan_expert_slots(SCORES, similarity(), 4, 0.0)
    assert [[e for e, _ in s] for s in all_bases] == [[1], [2, 0, 6], [3, 4], [5, 7]]
    half_up = plan_expert_slots(SCORES, similarity(), 5, 0.5)  # round(2.5) -> 3 intact: 3, 1, 5; bases 2, 6
    assert [[e for e, _ in s] for s in half_up] == [[1], [2, 0, 7], [3], [5], [6, 4]]
    zeros = plan_expert_slots([0.0] * 4, torch.eye(4), 2, 0.0)  # all-zero scores merge uniformly
    assert zeros == [[(0, 1 / 3), (2, 1 / 3), (3, 1 / 3)], [(1, 1.0)]]
    never_routed = plan_expert_slots([0.5, 0.0, 0.25], torch.ones(3, 3), 1, 0.0)  # weight 0 would be a no-op
    assert never_routed == [[(0, 0.5 / 0.75), (2, 0.25 / 0.75)]]


def check_plan(plan: CompressionPlan, spec: TargetSpec, imp: Importance) -> None:
    """Every invariant a plan must satisfy for `prune`."""
    src, tgt = plan.source, plan.target
    assert tgt.num_layers == len(plan.layers) == spec.num_layers
    assert plan.layers == sorted(set(plan.layers))
    assert tgt.mixer_types == [src.mixer_types[i] for i in plan.layers]
    n_full = src.mixer_types.count(ATTENTION)
    assert tgt.mixer_types.count(ATTENTION) * src.num_layers == n_full * tgt.num_layers
    assert tgt.mixer_types.count(ATTENTION) >= 1
    assert plan.hidden_channels == sorted(set(plan.hidden_channels)) and len(plan.hidden_channels) == spec.hidden_size
    moe_keys = [f"layers.{i}" for i in plan.layers if src.mlp_types[i] == MOE] + \
               [f"mtp.{d}" for d in range(tgt.mtp_num_layers)]
    assert list(plan.experts) == moe_keys
    n_intact = math.floor(spec.preserve_ratio * spec.num_experts + 0.5)
    for key, slots in plan.experts.items():
        assert len(slots) == tgt.num_experts
        used = [e for slot in slots for e, _ in slot]
        assert len(used) == len(set(used)) and all(0 <= e < src.num_experts for e in used)
        assert all(sum(w for _, w in slot) == pytest.approx(1.0, abs=1e-12) for slot in slots)
        assert all(w > 0 for slot in slots for _, w in slot)
        scores = imp.tensors[f"{key}.experts.{spec.expert_criterion}"].tolist()
        ranked = sorted(range(src.num_experts), key=lambda e: (-scores[e], e))
        assert {s[0][0] for s in slots} == set(ranked[:tgt.num_experts])  # intact experts and bases lead slots
        assert {e for e in ranked[:n_intact]} <= {s[0][0] for s in slots if len(s) == 1}
        assert all(e in ranked[tgt.num_experts:] for s in slots for e, _ in s[1:])
        assert len(plan.expert_neurons[key]) == len(slots)
        assert all(n == sorted(set(n)) and len(n) == tgt.moe_ffn_hidden_size for n in plan.expert_neurons[key])
        assert len(plan.shared_expert_neurons[key]) == tgt.shared_expert_ffn_hidden_size
    attention = [k for k in moe_keys if k.startswith("mtp.") or src.mixer_types[int(k.split(".")[1])] == ATTENTION]
    assert sorted(plan.query_groups) == sorted(attention)
    assert all(len(g) == tgt.num_query_groups for g in plan.query_groups.values())
    assert tgt.num_attention_heads == tgt.num_query_groups * src.num_attention_heads // src.num_query_groups
    gdn = [f"layers.{i}" for i in plan.layers if src.mixer_types[i] == GDN]
    assert sorted(plan.gdn_key_heads) == sorted(gdn)
    assert all(len(h) == tgt.linear_num_key_heads for h in plan.gdn_key_heads.values())
    assert tgt.linear_num_value_heads == tgt.linear_num_key_heads * 2


@pytest.mark.parametrize("criterion, similarity_name, ratio", [
    ("frequency", "router_cosine", 0.5), ("soft_logits", "coactivation", 0.0), ("reap", "router_cosine", 1.0),
    ("frequency", "coactivation", 0.34)])
def test_plans_honour_constraints_and_are_deterministic(criterion, similarity_name, ratio):
    changes = dict(expert_criterion=criterion, merge_similarity=similarity_name, preserve_ratio=ratio)
    plan = student_plan(**changes)
    check_plan(plan, dataclasses.replace(STUDENT, **changes), synthetic_importance(plan.source))
    if ratio == 1.0:
        assert all(len(s) == 1 for slots in plan.experts.values() for s in slots)
    if ratio == 0.0:
        assert all(len({e for s in slots for e, _ in s}) == 8 for slots in plan.experts.values())
    from megatron_slim.compress.plan_check import check_plan as prune_check

    prune_check(plan, plan.source)  # what `prune` accepts
    again = student_plan(**changes)
    assert json.dumps(again.to_json()) == json.dumps(plan.to_json())
    assert CompressionPlan.from_json(json.loads(json.dumps(plan.to_json()))).to_json() == plan.to_json()


def test_hand_built_statistics_drive_every_choice():
    src = tiny("qwen3_next", mtp=1, **NEXT8)
    imp = synthetic_importance(src)
    # Both full-attention layers (3, 7) rank first overall, but the hybrid rule keeps exactly one of them.
    for i, s in enumerate([0.5, 0.1, 0.6, 0.95, 0.3, 0.2, 0.7, 0.99]):
        imp.tensors[f"layers.{i}.block_influence"] = torch.tensor([s])
    imp.tensors["mtp.0.experts.frequency"] = torch.tensor(SCORES)
    imp.tensors["mtp.0.experts.router_cosine"] = similarity()
    neurons = torch.zeros(8, 32)
    neurons[5, 16:] = 1.0  # base 5 wants the upper half; merged member 4 would want the lower half
    neurons[4, :16] = 2.0
    imp.tensors["mtp.0.experts.neurons"] = neurons
    imp.tensors["layers.2.gdn.heads"] = torch.tensor([0.9, 0.0, 0.5, 0.5])  # key head 1 (sum 1.0) beats 0 (0.9)
    imp.tensors["layers.7.attention.query_groups"] = torch.tensor([0.2, 0.3])
    imp.tensors["hidden.channels"] = torch.cat([torch.zeros(16), torch.ones(48)])
    plan = make_plan(imp, dataclasses.replace(STUDENT, num_experts=4))
    assert plan.layers == [0, 2, 6, 7]
    assert plan.hidden_channels == list(range(16, 64))
    assert [[e for e, _ in s] for s in plan.experts["mtp.0"]] == [[1], [2, 0, 6], [3], [5, 4, 7]]
    assert plan.expert_neurons["mtp.0"][3] == list(range(16, 32))
    assert plan.gdn_key_heads["layers.2"] == [1]
    assert plan.query_groups["layers.7"] == [1]


@pytest.mark.parametrize("keep_dense", [True, False])
def test_dense_layers_are_planned_and_accepted_by_prune(keep_dense):
    from megatron_slim.compress.plan_check import check_plan as prune_check

    src = tiny("qwen3_moe", mlp_only_layers=[0, 2])
    imp = synthetic_importance(src)
    for i, s in enumerate([0.9, 0.8, 0.1, 0.2] if keep_dense else [0.1, 0.9, 0.2, 0.8]):
        imp.tensors[f"layers.{i}.block_influence"] = torch.tensor([s])
    plan = make_plan(imp, TargetSpec(num_layers=2, hidden_size=32, num_experts=4, dense_ffn_hidden_size=48))
    assert plan.layers == ([0, 1] if keep_dense else [1, 3])
    assert {k: len(v) for k, v in plan.dense_mlp_neurons.items()} == ({"layers.0": 48} if keep_dense else {})
    assert plan.target.dense_ffn_hidden_size == (48 if keep_dense else 96)
    prune_check(plan, src)
    assert account(plan.target).components["dense_mlp"].total == (3 * 32 * 48 if keep_dense else 0)


def test_missing_statistics_are_listed():
    src = tiny("qwen3_next", mtp=1, **NEXT8)
    imp = synthetic_importance(src)
    del imp.tensors["mtp.0.experts.router_cosine"]
    with pytest.raises(ImportanceError, match="lacks .*mtp.0.experts.router_cosine"):
        make_plan(imp, STUDENT)
    with pytest.raises(ImportanceError, match=r"layers.0.loss_increase.*--layer-loss"):
        make_plan(imp, TargetSpec(num_layers=4, depth_criterion="loss_increase"))
    imp.tensors["hidden.channels"] = torch.ones(3)
    with pytest.raises(ImportanceError, match=r"hidden.channels has shape \[3\], expected \[64\]"):
        make_plan(imp, STUDENT)


def test_no_expert_change_keeps_identity_slots_without_statistics():
    src = tiny("mixtral")
    imp = Importance(src, {f"layers.{i}.block_influence": torch.tensor([float(i)]) for i in range(4)}, tokens=1)
    plan = make_plan(imp, TargetSpec(num_layers=2))
    assert plan.layers == [2, 3]
    assert plan.experts["layers.2"] == [[(e, 1.0)] for e in range(8)]
    assert plan.hidden_channels is None and not plan.expert_neurons


# ---- validation ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, fields, match", [
    ("qwen3_next", dict(hidden_size=128), "hidden_size=128 is larger than the source's 64"),
    ("qwen3_next", dict(num_experts=4, topk=6), "topk=6 is larger than the source's 2"),
    ("qwen3_next", dict(num_experts=1), "topk=2 exceeds num_experts=1"),
    ("qwen3_next", dict(num_experts=6, ep=4), "num_experts=6 is not divisible by ep=4"),
    ("qwen3_next", dict(tp=4), "gdn_key_heads=2 is not divisible by tp=4"),
    ("qwen3_next", dict(moe_ffn_hidden_size=30, tp=4), "moe_ffn_hidden_size=30 is not divisible by tp=4"),
    ("qwen3_next", dict(query_groups=1, tp=2, gdn_key_heads=2), None),
    ("qwen3_moe", dict(tp=4), None),  # 2 query groups replicated over tp=4
    ("qwen3_moe", dict(num_layers=3, pp=2), "num_layers=3 is not divisible by pp=2"),
    ("qwen3_next", dict(num_layers=3), "use a multiple of 4"),
    ("qwen3_moe", dict(gdn_key_heads=1), "the source has no Gated DeltaNet layers"),
    ("mixtral", dict(shared_expert_ffn_hidden_size=8), "no shared expert"),
    ("qwen3_next", dict(mtp_layers=1), "mtp_layers=1 is larger than the source's 0"),
    ("qwen3_next", dict(preserve_ratio=1.5), r"preserve_ratio=1.5 must be in \[0, 1\]"),
    ("qwen3_next", dict(expert_criterion="entropy"), "expert_criterion='entropy' is not one of"),
    ("qwen3_next", dict(num_layers=0), "num_layers=0 must be >= 1"),
])
def test_target_validation(family, fields, match):
    spec = TargetSpec(**fields)
    if match is None:
        spec.validate(tiny(family))
        return
    with pytest.raises(TargetError, match=match):
        spec.validate(tiny(family))


def test_target_yaml_errors(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("num_layers: 4\nnum_heads: 2\n")
    with pytest.raises(TargetError, match=r"unknown keys \['num_heads'\]"):
        TargetSpec.from_yaml(bad)
    bad.write_text("num_layers: four\n")
    with pytest.raises(TargetError, match="num_layers has the wrong type"):
        TargetSpec.from_yaml(bad)
    good = tmp_path / "g.yaml"
    good.write_text("num_layers: 4\npreserve_ratio: 1\n")
    spec = TargetSpec.from_yaml(good).with_overrides(num_layers=2, hidden_size=None)
    assert (spec.num_layers, spec.hidden_size, spec.preserve_ratio) == (2, None, 1)


# ---- CLI ----------------------------------------------------------------------------------------------------

def test_cli_plan_writes_plan_plots_and_json(tmp_path, capsys):
    src = tiny("qwen3_next", mtp=1, **NEXT8)
    imp = synthetic_importance(src)
    imp.save(tmp_path / "imp.safetensors")
    target = tmp_path / "target.yaml"
    target.write_text("num_layers: 4\nhidden_size: 48\nnum_experts: 4\ntopk: 2\nquery_groups: 1\n")
    args = ["plan", "--importance", str(tmp_path / "imp.safetensors"), "--target", str(target), "--num-experts", "6",
            "--out", str(tmp_path / "plan.json"), "--plots", str(tmp_path / "plots"), "--json"]
    assert cli_main(args) == 0
    out = json.loads(capsys.readouterr().out)
    plan = CompressionPlan.load(tmp_path / "plan.json")
    assert plan.target.num_experts == 6 and plan.target.num_query_groups == 1  # the flag beat the YAML
    assert out["target"]["total"] == account(plan.target).total < out["source"]["total"] == account(src).total
    expected = make_plan(imp, TargetSpec(num_layers=4, hidden_size=48, num_experts=6, topk=2, query_groups=1))
    assert json.dumps(plan.to_json(), sort_keys=True) == json.dumps(expected.to_json(), sort_keys=True)
    for name in ("experts.png", "layers.png", "hidden.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli_main(args) == 2 and "exists" in capsys.readouterr().err


def test_cli_validates_target_before_loading_importance(tmp_path, capsys, monkeypatch):
    synthetic_importance(tiny("qwen3_next")).save(tmp_path / "imp.safetensors")
    monkeypatch.setattr(Importance, "load", lambda *a, **k: pytest.fail("loaded before validating the target"))
    rc = cli_main(["plan", "--importance", str(tmp_path / "imp.safetensors"), "--num-layers", "3",
                   "--out", str(tmp_path / "plan.json")])
    assert rc == 2 and "use a multiple of 4" in capsys.readouterr().err
    assert not (tmp_path / "plan.json").exists()


def test_cli_accounting_only(capsys):
    teacher = str(EXAMPLES / "teacher_config.json")
    assert cli_main(["plan", "--config", teacher, "--target", str(EXAMPLES / "target.yaml"),
                     "--source-mtp-layers", "1"]) == 0
    text = capsys.readouterr().out
    assert "routed_experts" in text and "81.32B" in text and "23.81B" in text
    assert cli_main(["plan", "--config", teacher, "--num-experts", "128", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"] is None and out["target"]["components"]["routed_experts"]["total"] * 4 == \
        out["source"]["components"]["routed_experts"]["total"]
    assert cli_main(["plan", "--config", teacher, "--out", "x.json"]) == 2
    assert "--out and --plots need --importance" in capsys.readouterr().err
