"""`megatron-slim prune`: functional invariants on constructed weights (float64 transformers forwards, MTP head
included), HF/Megatron outputs that load and agree at TP=2/EP=2, and a pruned student of a trained tiny teacher
that starts far below a random init of the same shape."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from megatron_slim.checkpoint.source import plan_hf_to_mcore
from megatron_slim.compress import surgery
from megatron_slim.compress.plan import CompressionPlan
from megatron_slim.compress.plan_check import PlanError, implied_target
from megatron_slim.compress.prune_checkpoint import Options, prune_checkpoint, spec_for
from megatron_slim.models.config import ATTENTION, DENSE_MLP, GDN, MOE, ModelConfig
from megatron_slim.models.registry import FAMILIES as REGISTERED, model_config_from_hf
from megatron_slim.models.surgery_spec import (
    DENSE_NEURONS,
    EXPERT_NEURONS,
    EXPERTS,
    GDN_KEY_HEADS,
    HIDDEN,
    QUERY_GROUPS,
    SHARED_NEURONS,
    TensorSpec,
    units,
)
from megatron_slim.verify.hf_reference import (
    load_hf_reference,
    mtp_reference_logits,
    reference_hidden,
    reference_logits,
)
from support import tiny_models
from support.dist import run_distributed
from support.hf_checkpoints import build_tiny_hf, random_mtp_tensors, read_tensors, saved_shapes

TOKENS = torch.randint(0, tiny_models.VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
FAMILIES = sorted(tiny_models.FAMILIES)
LAYER_PREFIX = ("model.layers.", "mtp.layers.")


# ---------------------------------------------------------------- helpers


def write_all(hf_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the checkpoint's weights with `tensors`, as one safetensors file."""
    for path in [*hf_dir.glob("*.safetensors"), hf_dir / "model.safetensors.index.json"]:
        path.unlink(missing_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, hf_dir / "model.safetensors", metadata={"format": "pt"})


def make_source(family: str, out: Path, seed: int = 0, dtype: torch.dtype = torch.float64, **over) -> Path:
    """Tiny random HF checkpoint with random norm weights (and an MTP layer for Qwen3-Next)."""
    model = build_tiny_hf(tiny_models.FAMILIES[family](**over), seed)
    model.save_pretrained(out)
    tensors = read_tensors(out)
    if family == "qwen3_next":
        tensors |= random_mtp_tensors(model, saved_shapes(out), seed + 1, mtp_layers=1)
    gen = torch.Generator().manual_seed(seed + 2)
    for k, v in tensors.items():
        if "norm" in k:  # random init leaves norms at 0/1, which would hide rescaling mistakes
            tensors[k] = v + torch.randn(v.shape, generator=gen) * 0.2
    write_all(out, {k: v.to(dtype) for k, v in tensors.items()})
    return out


def source_config(hf_dir: Path) -> ModelConfig:
    return plan_hf_to_mcore(hf_dir)[0]


def make_plan(hf_dir: Path, **choices) -> CompressionPlan:
    """A plan with the given selections; its target is the config they imply."""
    src = source_config(hf_dir)
    plan = CompressionPlan(source=src, target=src, layers=choices.pop("layers", list(range(src.num_layers))),
                           **choices)
    problems: list[str] = []
    plan.target = implied_target(plan, problems)
    assert not problems, problems
    return plan


def moe_prefixes(cfg: ModelConfig) -> list[str]:
    return [f"layers.{i}" for i, t in enumerate(cfg.mlp_types) if t == MOE] + \
        [f"mtp.{d}" for d in range(cfg.mtp_num_layers)]


def prune(plan: CompressionPlan, src: Path, out: Path, **opts) -> Path:
    prune_checkpoint(plan, src, out, "hf", opts=Options(**opts), progress=False, overwrite=True)
    return out


def logits(hf_dir: Path) -> list[torch.Tensor]:
    """float64 logits of the main head and, when the checkpoint has one, the MTP head."""
    model = load_hf_reference(hf_dir, dtype=torch.float64)
    out = [reference_logits(model, TOKENS)]
    if any(k.startswith("mtp.") for k in read_tensors(hf_dir)):
        out.append(mtp_reference_logits(hf_dir, TOKENS, reference_hidden(model, TOKENS)))
    return out


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def entries(tensors: dict[str, torch.Tensor], family: str) -> list[tuple[str, TensorSpec]]:
    """(key, surgery table entry) of every tensor."""
    spec = REGISTERED[family].surgery
    out = []
    for key in tensors:
        rel = key
        for prefix in LAYER_PREFIX:
            if key.startswith(prefix):
                rel = key[len(prefix):].split(".", 1)[1]
        out.append((key, spec.tensors[spec_for(spec, rel)[0]]))
    return out


def writes_residual(tspec: TensorSpec) -> bool:
    """Output projections into the residual stream: hidden channels on dim 0 (norms aside)."""
    return not tspec.norm and any(d.axis == HIDDEN and d.dim == 0 for d in tspec.dims)


def hold_channel_constant(tensors: dict[str, torch.Tensor], cfg: ModelConfig, c: int) -> None:
    """Make residual channel `c` equal 1 everywhere (embeddings set it, nothing writes it, the MTP fc copies it),
    with unit norm gain there: every norm output is then positive at `c`, so a router row very negative at `c`
    gives its expert a probability that underflows to exactly 0 (in float32 as in float64)."""
    for key, tspec in entries(tensors, cfg.family):
        t = tensors[key]
        if key == "model.embed_tokens.weight":
            t[:, c] = 1.0
        elif tspec.norm:
            t[c] = 0.0 if cfg.zero_centered_norm else 1.0
        elif writes_residual(tspec):
            t[c] = 0.0
            if key == "mtp.fc.weight":
                t[c, c] = 1.0  # the MTP residual starts from the normed embedding's channel c


def kill_experts(tensors: dict[str, torch.Tensor], cfg: ModelConfig, c: int, dead: list[int]) -> None:
    for key, tspec in entries(tensors, cfg.family):
        if any(d.axis == EXPERTS for d in tspec.dims):
            tensors[key][dead, c] = -1e6


# transformers computes router probabilities in float32 (`softmax(router_logits.float())`) even in a float64
# model. Removing or merging experts changes the softmax's reduction length, so the routing weights of the same
# experts may round differently (observed 4e-7 in the logits on AMD EPYC, 0 on other CPUs); a wrong expert, row or
# weight moves the logits by > 1e-4.
FLOAT32_ROUTING = 1e-5

# ---------------------------------------------------------------- functional invariants


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_never_routed_experts_keeps_logits(tmp_path, family):
    src = make_source(family, tmp_path / "src")
    cfg, tensors = source_config(src), read_tensors(src)
    dead = [1, 4, 6]
    hold_channel_constant(tensors, cfg, c=0)
    kill_experts(tensors, cfg, c=0, dead=dead)
    write_all(src, tensors)
    live = [e for e in range(cfg.num_experts) if e not in dead]
    plan = make_plan(src, experts={p: [[(e, 1.0)] for e in live] for p in moe_prefixes(cfg)})
    out = prune(plan, src, tmp_path / "out")
    assert model_config_from_hf(out).num_experts == len(live)
    assert max_diff(logits(src), logits(out)) < FLOAT32_ROUTING


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_next"])
def test_removing_layers_that_write_nothing_keeps_logits(tmp_path, family):
    src = make_source(family, tmp_path / "src")
    tensors = read_tensors(src)
    for key, tspec in entries(tensors, family):
        if key.startswith(("model.layers.1.", "model.layers.2.")) and writes_residual(tspec):
            tensors[key].zero_()
    write_all(src, tensors)
    out = prune(make_plan(src, layers=[0, 3]), src, tmp_path / "out")
    if family == "qwen3_next":  # the hybrid pattern follows the kept layers
        assert json.loads((out / "config.json").read_text())["layer_types"] == ["linear_attention", "full_attention"]
    assert max_diff(logits(src), logits(out)) < 1e-12


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_next"])
def test_removing_heads_and_neurons_that_write_nothing_keeps_logits(tmp_path, family):
    """Query groups, GDN key heads and FFN neurons (routed experts, shared expert, a dense layer) whose output
    projection columns are zero contribute nothing; removing them must pick exactly the other units' rows in every
    tensor (q/gate/k/v rows, GDN q/k/v/z/b/a rows, conv channels, A_log/dt_bias, gate/up rows)."""
    src = make_source(family, tmp_path / "src", mlp_only_layers=[1])
    cfg, tensors = source_config(src), read_tensors(src)
    drop = {QUERY_GROUPS: [1], GDN_KEY_HEADS: [0], EXPERT_NEURONS: list(range(0, 32, 2)),
            SHARED_NEURONS: list(range(16, 48)), DENSE_NEURONS: list(range(0, 96, 3))}
    for key, tspec in entries(tensors, family):
        for d in tspec.dims:
            if d.axis in drop and writes_residual(tspec):
                where = surgery.select_units(torch.arange(tensors[key].shape[d.dim]), 0, drop[d.axis],
                                             units(cfg, d.axis))
                tensors[key].index_fill_(d.dim, where, 0.0)
    write_all(src, tensors)
    keep = {axis: [u for u in range(units(cfg, axis)) if u not in dropped] for axis, dropped in drop.items()}
    layers = [(f"layers.{i}", m, f) for i, (m, f) in enumerate(zip(cfg.mixer_types, cfg.mlp_types))]
    layers += [(p, ATTENTION, MOE) for p in moe_prefixes(cfg) if p.startswith("mtp.")]
    moe = [p for p, _, f in layers if f == MOE]
    plan = make_plan(
        src, query_groups={p: keep[QUERY_GROUPS] for p, m, _ in layers if m == ATTENTION},
        gdn_key_heads={p: keep[GDN_KEY_HEADS] for p, m, _ in layers if m == GDN},
        expert_neurons={p: [keep[EXPERT_NEURONS]] * cfg.num_experts for p in moe},
        shared_expert_neurons={p: keep[SHARED_NEURONS] for p in moe if cfg.shared_expert_ffn_hidden_size},
        dense_mlp_neurons={p: keep[DENSE_NEURONS] for p, _, f in layers if f == DENSE_MLP})
    assert plan.target.num_query_groups == 1 and plan.target.moe_ffn_hidden_size == 16
    assert max_diff(logits(src), logits(prune(plan, src, tmp_path / "out"))) < 1e-12


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_zero_hidden_channels_keeps_logits(tmp_path, family):
    """Dropped channels are zero in every tensor, so the residual stream is zero there at every position. RMSNorm
    over the kept channels then sees the same sum of squares but divides it by H' instead of H: prune scales the
    norm gains by sqrt(H/H') to compensate, which is exact except for eps (one config value, shared with the q/k
    norms, so not rescaled): the model uses eps = 1e-12 here, so 'unchanged' means up to float32 rounding
    (transformers computes RMSNorm in float32 even in a float64 model). Without the rescale every norm output
    shrinks by sqrt(H'/H) and the logits move by orders of magnitude more."""
    src = make_source(family, tmp_path / "src", rms_norm_eps=1e-12)
    cfg, tensors = source_config(src), read_tensors(src)
    drop = torch.randperm(cfg.hidden_size, generator=torch.Generator().manual_seed(1))[:16].tolist()
    for key, tspec in entries(tensors, family):
        for d in (d for d in tspec.dims if d.axis == HIDDEN):
            size = tensors[key].shape[d.dim]
            where = surgery.select_units(torch.arange(size), 0, drop, cfg.hidden_size,
                                         d.sections(cfg) if d.sections else None)
            tensors[key].index_fill_(d.dim, where, 0.0)
    write_all(src, tensors)
    plan = make_plan(src, hidden_channels=sorted(set(range(cfg.hidden_size)) - set(drop)))
    ref = logits(src)
    assert max_diff(ref, logits(prune(plan, src, tmp_path / "out"))) < 1e-5
    assert max_diff(ref, logits(prune(plan, src, tmp_path / "raw", rescale_norms=False))) > 1e-2


def test_merging_identical_experts_keeps_the_expert_function():
    gen = torch.Generator().manual_seed(0)
    gate, up, down = torch.randn(32, 16, generator=gen), torch.randn(32, 16, generator=gen), \
        torch.randn(16, 32, generator=gen)
    perm = torch.randperm(32, generator=gen)
    x = torch.randn(5, 16, generator=gen)

    def expert(g, u, d):
        return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)

    same = [[gate, up, down]] * 3
    permuted = [[gate, up, down], [gate[perm], up[perm], down[:, perm]]]
    for align in (False, True):
        assert torch.allclose(expert(*surgery.merge_experts(same, [0.5, 0.3, 0.2], [0, 0, 1], align)),
                              expert(gate, up, down), atol=1e-5)
    aligned = surgery.merge_experts(permuted, [0.5, 0.5], [0, 0, 1], align=True)
    assert torch.allclose(expert(*aligned), expert(gate, up, down), atol=1e-5)
    assert not torch.allclose(expert(*surgery.merge_experts(permuted, [0.5, 0.5], [0, 0, 1])), expert(gate, up, down),
                              atol=1e-2)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_next"])
def test_merging_a_permuted_copy_into_its_original_keeps_logits(tmp_path, family):
    """Expert 3 is expert 2 with its neurons permuted (the same function) and is never routed; merging it into
    expert 2 with neuron alignment reproduces the model (router 'keep'); plain averaging does not."""
    src = make_source(family, tmp_path / "src")
    cfg, tensors = source_config(src), read_tensors(src)
    hold_channel_constant(tensors, cfg, c=0)
    kill_experts(tensors, cfg, c=0, dead=[3])
    perm = torch.randperm(cfg.moe_ffn_hidden_size, generator=torch.Generator().manual_seed(3))
    for key, tspec in entries(tensors, family):
        if ".experts.2." in key:
            d = next(d.dim for d in tspec.dims if d.axis == EXPERT_NEURONS)
            tensors[key.replace(".experts.2.", ".experts.3.")] = tensors[key].index_select(d, perm)
    write_all(src, tensors)
    slots = [[(0, 1.0)], [(1, 1.0)], [(2, 0.6), (3, 0.4)]] + [[(e, 1.0)] for e in range(4, cfg.num_experts)]
    plan = make_plan(src, experts={p: slots for p in moe_prefixes(cfg)})
    ref = logits(src)
    assert max_diff(ref, logits(prune(plan, src, tmp_path / "aligned", align_neurons=True))) < FLOAT32_ROUTING
    assert max_diff(ref, logits(prune(plan, src, tmp_path / "averaged"))) > 1e-4


def test_plan_that_misdescribes_its_target_is_refused(tmp_path):
    src = make_source("qwen3_moe", tmp_path / "src")
    plan = make_plan(src, layers=[0, 2])
    plan.target = plan.target.replace(num_layers=3, mixer_types=["*"] * 3, mlp_types=["E"] * 3)
    with pytest.raises(PlanError, match="target.num_layers = 3, the plan's selections give 2"):
        prune(plan, src, tmp_path / "out")
    plan = make_plan(src)
    plan.experts["layers.0"] = [[(0, 0.5), (0, 0.5)]] + [[(e, 1.0)] for e in range(1, 8)]
    with pytest.raises(PlanError, match="unique"):
        prune(plan, src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# ---------------------------------------------------------------- formats, TP/EP loading, parameter counts

LAYOUTS = {"tp2": {"tp": 2}, "ep2": {"ep": 2}}


def cli(*commands: list[str | Path]) -> None:
    """Run `megatron-slim` commands concurrently (each is mostly start-up: imports, a meta-device model)."""
    runs = []
    for command in commands:
        err = tempfile.TemporaryFile("w+")
        runs.append((command, err, subprocess.Popen([sys.executable, "-m", "megatron_slim.cli", *map(str, command)],
                                                    stdout=subprocess.DEVNULL, stderr=err, text=True)))
    for command, err, proc in runs:
        proc.wait(timeout=600)
        err.seek(0)
        assert proc.returncode == 0, f"megatron-slim {' '.join(map(str, command))} failed:\n{err.read()[-3000:]}"
        err.close()


def parity_and_size(rank: int, world: int, hf_dir: str, mcore_dir: str, target: dict, tokens: torch.Tensor) -> dict:
    """`verify` at LAYOUTS (strict loads), plus the parameter count of a Megatron model built from the target."""
    from megatron_slim.checkpoint.layout import mcore_layout
    from support.workers import verify_sweep

    reports = verify_sweep(rank, world, hf_dir, mcore_dir, LAYOUTS, tokens)
    shapes = mcore_layout(ModelConfig.from_json(target)).tensors.values()
    return {"reports": reports, "params": sum(torch.Size(s).numel() for s in shapes)}


def test_pruned_checkpoints_load_in_transformers_and_megatron(tmp_path):
    """Every kind of pruning at once on Qwen3-Next (MTP included), HF and Megatron in and out via the CLI."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_slim.checkpoint.mcore_reader import McoreReader
    from megatron_slim.models.registry import hf_config_from

    src = make_source("qwen3_next", tmp_path / "src", dtype=torch.float32, num_attention_heads=8,
                      num_key_value_heads=4, linear_num_key_heads=4, linear_num_value_heads=8)
    gen = torch.Generator().manual_seed(0)
    slots = [[(0, 1.0)], [(5, 1.0)], [(1, 0.5), (2, 0.3), (3, 0.2)], [(4, 0.7), (6, 0.2), (7, 0.1)]]
    prefixes = ["layers.0", "layers.3", "mtp.0"]
    plan = make_plan(
        src, layers=[0, 3], hidden_channels=sorted(torch.randperm(64, generator=gen)[:48].tolist()),
        router="average", experts={p: slots for p in prefixes},
        expert_neurons={p: [torch.randperm(32, generator=gen)[:16].tolist() for _ in slots] for p in prefixes},
        shared_expert_neurons={p: torch.randperm(48, generator=gen)[:32].tolist() for p in prefixes},
        query_groups={"layers.3": [1, 3], "mtp.0": [0, 2]}, gdn_key_heads={"layers.0": [3, 1]})
    plan.save(tmp_path / "plan.json")
    hf, mc, hf_via_mc = tmp_path / "hf", tmp_path / "mc", tmp_path / "hf_via_mc"
    cli(["convert", "hf-to-mcore", "--hf", src, "--out", tmp_path / "src_mc", "--no-progress"],
        ["prune", "--plan", tmp_path / "plan.json", "--in", src, "--out", mc, "--out-format", "mcore", "--no-progress"])
    cli(["prune", "--plan", tmp_path / "plan.json", "--in", tmp_path / "src_mc", "--out", hf_via_mc, "--no-progress"])
    prune(plan, src, hf)

    a, b = read_tensors(hf), read_tensors(hf_via_mc)  # surgery sees the same HF-layout tensors from either input
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)

    model, info = AutoModelForCausalLM.from_pretrained(hf, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert all(k.startswith("mtp.") for k in info["unexpected_keys"])  # transformers has no MTP module
    target_hf = hf_config_from(plan.target)
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(AutoConfig.for_model(target_hf.pop("model_type"), **target_hf))
    hf_params = sum(p.numel() for p in model.parameters())
    assert hf_params == sum(p.numel() for p in fresh.parameters())

    per_rank = run_distributed(parity_and_size, 2, str(hf), str(mc), plan.target.to_json(), TOKENS, timeout_s=600)
    reports = {name: r for result in per_rank for name, r in result["reports"].items()}
    assert sorted(reports) == sorted(LAYOUTS)
    for layout, report in reports.items():
        for head in ("main", "mtp1"):
            assert report[head]["max_abs_diff"] <= 1e-4 and report[head]["top1_agreement"] == 1.0, (layout, report)
    stored = McoreReader(mc).tensors
    mtp_params = sum(t.numel() for k, t in a.items() if k.startswith("mtp."))
    assert per_rank[0]["params"] == sum(torch.Size(s).numel() for s, _ in stored.values()) == hf_params + mtp_params


# ---------------------------------------------------------------- a pruned student of a trained teacher

TOPICS = 4
_LANGUAGE = torch.stack([torch.randperm(tiny_models.VOCAB, generator=torch.Generator().manual_seed(t))
                         for t in range(TOPICS)])


def synthetic_text(n: int, seq: int, seed: int) -> torch.Tensor:
    """A toy language: a topic token, then a chain x[t+1] = perm_topic(x[t]) with 10% random tokens. Its entropy
    is about 0.8 nats/token; an untrained model sits at ln(vocab) = 4.85."""
    gen = torch.Generator().manual_seed(seed)
    topic = torch.randint(0, TOPICS, (n,), generator=gen)
    x = torch.empty(n, seq, dtype=torch.long)
    x[:, 0], x[:, 1] = topic, torch.randint(TOPICS, tiny_models.VOCAB, (n,), generator=gen)
    for t in range(2, seq):
        noise = torch.randint(0, tiny_models.VOCAB, (n,), generator=gen)
        x[:, t] = torch.where(torch.rand(n, generator=gen) < 0.9, _LANGUAGE[topic, x[:, t - 1]], noise)
    return x


EVAL_TEXT = synthetic_text(64, 33, seed=10_000)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny Qwen3-MoE trained for 200 steps on the toy language (about 15 s on one core)."""
    model = build_tiny_hf(tiny_models.qwen3_moe(initializer_range=0.02), seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(200):
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 20)
        x = synthetic_text(16, 33, seed=step)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp("teacher") / "hf"
    model.eval().save_pretrained(out)
    return out


@torch.no_grad()
def lm_loss(model) -> float:
    return model(input_ids=EVAL_TEXT, labels=EVAL_TEXT).loss.item()


@torch.no_grad()
def teacher_statistics(hf_dir: Path) -> tuple[list[torch.Tensor], list[float]]:
    """Per layer: routing frequency of each expert and block influence (1 - cos(layer input, layer output))."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    influence: list[float] = []

    def hook(module, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        y = out[0] if isinstance(out, tuple) else out
        influence.append(1 - F.cosine_similarity(x, y, dim=-1).mean().item())

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    router_logits = model(input_ids=EVAL_TEXT, output_router_logits=True).router_logits
    for h in handles:
        h.remove()
    topk = model.config.num_experts_per_tok
    freq = [torch.bincount(r.topk(topk, -1).indices.flatten(), minlength=r.shape[-1]).float() / r.shape[0]
            for r in router_logits]
    return freq, influence


def merge_slots(freq: torch.Tensor, router: torch.Tensor, n_slots: int, n_intact: int) -> list[list]:
    """Partial preservation: the most used experts stay intact, the next ones are bases, and every other expert
    is merged into the base whose router row is most similar, weighted by routing frequency."""
    order = freq.argsort(descending=True).tolist()
    bases, rest = order[n_intact:n_slots], order[n_slots:]
    rows = F.normalize(router, dim=1)
    groups = {b: [b] for b in bases}
    for e in rest:
        groups[max(bases, key=lambda b: (rows[e] @ rows[b]).item())].append(e)
    slots = [[(e, 1.0)] for e in order[:n_intact]]
    for members in groups.values():
        w = freq[members] + 1e-3
        slots.append([(e, float(x)) for e, x in zip(members, w / w.sum())])
    return slots


def test_pruned_student_starts_far_below_random_init(teacher, tmp_path):
    """SlimQwen's first finding at toy scale: half the layers and half the experts of a trained teacher give a
    student whose loss before any training is far below a random init of the same shape."""
    from megatron_slim.verify.hf_reference import load_hf_reference

    freq, influence = teacher_statistics(teacher)
    layers = sorted(sorted(range(4), key=lambda i: -influence[i])[:2])
    plan = make_plan(teacher, layers=layers,
                     experts={f"layers.{i}": [[(e, 1.0)] for e in freq[i].argsort(descending=True)[:4].tolist()]
                              for i in layers})
    student = prune(plan, teacher, tmp_path / "student")
    teacher_loss = lm_loss(load_hf_reference(teacher))
    pruned_loss = lm_loss(load_hf_reference(student))
    random_loss = lm_loss(build_tiny_hf(json.loads((student / "config.json").read_text()), seed=1))
    print(f"\nteacher {teacher_loss:.3f}, pruned student (layers {layers}, 4/8 experts) {pruned_loss:.3f}, "
          f"random init of the student's shape {random_loss:.3f} nats/token")
    assert teacher_loss < 1.5 and random_loss > 4.5
    assert pruned_loss < 0.6 * random_loss


def test_merged_students_router_keep_vs_average(teacher, tmp_path):
    """8 -> 4 experts per layer by dropping, or by partial-preservation merging with the base's router row kept or
    averaged, with and without neuron alignment. Prints the losses (the lead picks plan defaults from them)."""
    from megatron_slim.verify.hf_reference import load_hf_reference

    freq, _ = teacher_statistics(teacher)
    tensors = read_tensors(teacher)
    routers = [tensors[f"model.layers.{i}.mlp.gate.weight"] for i in range(4)]
    losses = {"teacher": lm_loss(load_hf_reference(teacher))}
    top4 = [freq[i].argsort(descending=True)[:4].tolist() for i in range(4)]
    drop = make_plan(teacher, experts={f"layers.{i}": [[(e, 1.0)] for e in top4[i]] for i in range(4)})
    losses["drop"] = lm_loss(load_hf_reference(prune(drop, teacher, tmp_path / "drop")))
    for router in ("keep", "average"):
        plan = make_plan(teacher, router=router,
                         experts={f"layers.{i}": merge_slots(freq[i], routers[i], 4, 2) for i in range(4)})
        for align in (False, True):
            name = f"merge/{router}" + ("/aligned" if align else "")
            out = prune(plan, teacher, tmp_path / name.replace("/", "_"), align_neurons=align)
            losses[name] = lm_loss(load_hf_reference(out))
    print("\n" + "\n".join(f"{k:>22}: {v:.4f}" for k, v in losses.items()))
    assert all(losses["teacher"] < v < 2.5 for k, v in losses.items() if k != "teacher")
