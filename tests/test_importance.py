"""`megatron-slim importance`: statistics match a float64 reference computed independently on the transformers model
(hooks on its router, experts, attention, norms and decoder layers; MTP through a transformers decoder layer loaded
with the `mtp.*` weights), and every TP/EP/PP/DP layout gives the same file. Calibration windows from jsonl (token
ids or text) and Megatron indexed datasets."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from megatron_slim.compress.importance_file import Importance
from megatron_slim.compress.importance_hooks import sequence_count
from megatron_slim.data.calibration import calibration_windows, eos_token_id
from megatron_slim.errors import UserError
from support import tiny_models
from support.dist import run_distributed
from support.hf_checkpoints import build_tiny_hf, random_mtp_tensors, saved_shapes, write_shard

EOS, SEQ_LEN, SEQS = 1, 16, 4
# Qwen3-MoE with a dense layer (dense_mlp.neurons); Qwen3-Next with GDN, gated attention, shared expert and MTP.
FAMILIES = {"qwen3_moe": {"mlp_only_layers": [1]}, "qwen3_next": {}}
# 4 ranks each: the ranks left over by tp*pp are data-parallel (ep2 is TP=1 with DP=4).
LAYOUTS = {"ep2": {"ep": 2}, "tp2": {"tp": 2, "micro_batch": 2}, "tp2ep2": {"tp": 2, "ep": 2}, "pp2": {"pp": 2}}
EXACT = ("experts.frequency", "experts.coactivation")  # counts / tokens: equal unless a top-k decision differs


# ---------------------------------------------------------------- fixtures: tiny checkpoints and calibration data

def save_hf(family: str, out: Path, seed: int = 0) -> Path:
    """Random tiny HF checkpoint with non-trivial norm weights (and a random MTP layer for Qwen3-Next)."""
    model = build_tiny_hf(tiny_models.FAMILIES[family](eos_token_id=EOS, **FAMILIES[family]), seed)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    model.save_pretrained(out, max_shard_size="300KB")
    if family == "qwen3_next":
        write_shard(out, random_mtp_tensors(model, saved_shapes(out), seed + 1, mtp_layers=1))
    return out


def random_docs(n: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, tiny_models.VOCAB, (int(torch.randint(3, 20, (1,), generator=gen)),),
                          generator=gen).tolist() for _ in range(n)]


def expected_windows(docs: list[list[int]], seq_len: int, n: int) -> torch.Tensor:
    stream = [t for doc in docs for t in (doc if doc[-1] == EOS else doc + [EOS])]
    return torch.tensor(stream[:seq_len * n]).view(n, seq_len)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("importance")
    docs = random_docs(12, seed=0)
    data = write_jsonl(root / "calib.jsonl", [{"tokens": d} for d in docs])
    return {"root": root, "data": data, "tokens": expected_windows(docs, SEQ_LEN, SEQS),
            "hf": {f: save_hf(f, root / f) for f in FAMILIES}}


# ---------------------------------------------------------------- the float64 reference on transformers

def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3-Next's zero-centred RMSNorm (MTP input norms)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + w)


class Reference:
    """Per-statistic float64 sums from hooks on a transformers model; `result()` applies the schema's definitions."""

    def __init__(self, config, tokens: int) -> None:
        self.cfg = config
        self.tokens = tokens
        self.sums: dict[str, torch.Tensor] = {}
        self.handles: list = []
        self.inputs: dict[str, torch.Tensor] = {}

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def add(self, name: str, value: torch.Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0) + value.detach().double()

    def hook(self, module: torch.nn.Module, fn: Callable, pre: bool = False) -> None:
        if pre:
            self.handles.append(module.register_forward_pre_hook(lambda m, a, k: fn(a, k), with_kwargs=True))
        else:
            self.handles.append(module.register_forward_hook(lambda m, a, k, o: fn(a, k, o), with_kwargs=True))

    def watch_layer(self, layer: torch.nn.Module, p: str, channels: bool) -> None:
        c = self.cfg
        hidden = lambda a, k: a[0] if a else k["hidden_states"]  # noqa: E731
        self.hook(layer, lambda a, k: self.inputs.__setitem__(p, hidden(a, k)), pre=True)
        self.hook(layer, lambda a, k, o: self.add(f"{p}block_influence", F.cosine_similarity(
            self.inputs[p].reshape(-1, c.hidden_size), o.reshape(-1, c.hidden_size), dim=-1).sum()))
        if channels:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                self.hook(norm, lambda a, k, o: self.add("hidden.channels", o.abs().reshape(-1, c.hidden_size).sum(0)))
        if hasattr(layer, "linear_attn"):
            self.hook(layer.linear_attn.out_proj, lambda a, k: self.add(f"{p}gdn.heads", a[0].reshape(
                -1, c.linear_num_value_heads, c.linear_value_head_dim).norm(dim=-1).sum(0)), pre=True)
        else:
            self.hook(layer.self_attn.o_proj, lambda a, k: self.add(f"{p}attention.heads", a[0].reshape(
                -1, c.num_attention_heads, c.head_dim).norm(dim=-1).sum(0)), pre=True)
        mlp = layer.mlp
        if not hasattr(mlp, "gate"):
            self.hook(mlp.down_proj, lambda a, k: self.add(f"{p}dense_mlp.neurons", a[0].abs().reshape(
                -1, a[0].shape[-1]).sum(0)), pre=True)
            return
        w = F.normalize(mlp.gate.weight.double(), dim=-1)
        self.sums[f"{p}experts.router_cosine"] = w @ w.T

        def on_gate(a, k, out) -> None:
            logits, _, top = out
            onehot = F.one_hot(top, c.num_experts).sum(1).double()
            self.add(f"{p}experts.soft_logits", logits.double().softmax(-1).sum(0))
            self.add(f"{p}experts.frequency", onehot.sum(0))
            self.add(f"{p}experts.coactivation", onehot.T @ onehot)

        def on_experts(a, k, out) -> None:
            x, top, weights = a
            experts = mlp.experts
            reap, neurons = torch.zeros(c.num_experts, dtype=torch.float64), torch.zeros(
                c.num_experts, c.moe_intermediate_size, dtype=torch.float64)
            for e in range(c.num_experts):
                rows, slot = (top == e).nonzero(as_tuple=True)
                gate, up = F.linear(x[rows], experts.gate_up_proj[e]).chunk(2, dim=-1)
                act = F.silu(gate) * up
                y = F.linear(act, experts.down_proj[e]) * weights[rows, slot, None]
                reap[e], neurons[e] = y.norm(dim=-1).sum(), act.abs().sum(0)
            self.add(f"{p}experts.reap", reap)
            self.add(f"{p}experts.neurons", neurons)

        self.hook(mlp.gate, on_gate)
        self.hook(mlp.experts, on_experts)
        if hasattr(mlp, "shared_expert"):
            self.hook(mlp.shared_expert.down_proj, lambda a, k: self.add(
                f"{p}shared_expert.neurons", a[0].abs().reshape(-1, a[0].shape[-1]).sum(0)), pre=True)

    def result(self, lm_loss: float, skipped: list[float]) -> dict[str, torch.Tensor]:
        n, c = self.tokens, self.cfg
        out = {"hidden.channels": self.sums.pop("hidden.channels") / (n * (2 * c.num_hidden_layers + 1))}
        for name, s in self.sums.items():
            kind, index, stat = name.split(".", 2)
            count = self.sums[f"{kind}.{index}.experts.frequency"] if stat.startswith("experts.") else None
            if stat == "experts.reap":
                out[name] = torch.where(count > 0, s / count.clamp(min=1), 0)
            elif stat == "experts.neurons":
                out[name] = s / count.clamp(min=1)[:, None]
            elif stat == "experts.router_cosine":
                out[name] = s
            elif stat == "block_influence":
                out[name] = 1 - s / n
            else:
                out[name] = s / n
            if stat == "attention.heads":
                out[f"{kind}.{index}.attention.query_groups"] = out[name].view(c.num_key_value_heads, -1).sum(1)
        for i, loss in enumerate(skipped):
            out[f"layers.{i}.loss_increase"] = torch.tensor([loss - lm_loss], dtype=torch.float64)
        return {k: v.reshape(-1) if v.dim() == 0 else v for k, v in out.items()}


def _lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), tokens[:, 1:].reshape(-1)).item()


def _mtp_layer(model, hf_dir: Path) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A transformers decoder layer (full attention + sparse MoE) holding the checkpoint's mtp.layers.0 weights,
    and the MTP input tensors (fc, norms)."""
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextDecoderLayer

    c = model.config
    layer = Qwen3NextDecoderLayer(c, c.layer_types.index("full_attention")).double().eval()
    disk = {}
    for f in hf_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            disk |= {k[len("mtp."):]: st.get_tensor(k).double() for k in st.keys() if k.startswith("mtp.")}
    experts = range(c.num_experts)
    state = {k[len("layers.0."):]: v for k, v in disk.items() if k.startswith("layers.0.") and ".experts." not in k}
    state["mlp.experts.gate_up_proj"] = torch.stack([torch.cat(
        [disk[f"layers.0.mlp.experts.{e}.{w}_proj.weight"] for w in ("gate", "up")]) for e in experts])
    state["mlp.experts.down_proj"] = torch.stack([disk[f"layers.0.mlp.experts.{e}.down_proj.weight"] for e in experts])
    layer.load_state_dict(state, strict=True)
    return layer, {k: disk[k] for k in ("fc.weight", "pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight")}


@torch.no_grad()
def hf_reference(hf_dir: Path, tokens: torch.Tensor, mtp: bool) -> dict[str, torch.Tensor]:
    """Every importance statistic, with --layer-loss, from the transformers model in float64 on `tokens`."""
    from megatron_slim.verify.hf_reference import load_hf_reference

    model = load_hf_reference(hf_dir, dtype=torch.float64)
    c = model.config
    ref = Reference(c, tokens.numel())
    for i, layer in enumerate(model.model.layers):
        ref.watch_layer(layer, f"layers.{i}.", channels=True)
    ref.hook(model.model.norm, lambda a, k, o: ref.add("hidden.channels", o.abs().reshape(-1, c.hidden_size).sum(0)))
    out = model.model(input_ids=tokens, use_cache=False)
    lm_loss = _lm_loss(model.lm_head(out.last_hidden_state), tokens)
    ref.remove_hooks()
    if mtp:
        # megatron-core's MTP depth 1: position t combines the final hidden h[t] with the embedding of token t+1
        # (the last position gets the filler token 0), then runs the MTP decoder layer over every position.
        layer, io = _mtp_layer(model, hf_dir)
        rolled = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)
        emb = model.model.embed_tokens(rolled)
        x = F.linear(torch.cat([_rms(emb, io["pre_fc_norm_embedding.weight"], c.rms_norm_eps),
                                _rms(out.last_hidden_state, io["pre_fc_norm_hidden.weight"], c.rms_norm_eps)], -1),
                     io["fc.weight"])
        s = tokens.shape[1]
        mask = torch.full((s, s), float("-inf"), dtype=torch.float64).triu(1)[None, None]
        ref.watch_layer(layer, "mtp.0.", channels=False)
        layer(x, position_embeddings=model.model.rotary_emb(x, torch.arange(s)[None]), attention_mask=mask)
        ref.remove_hooks()
    skipped = []
    for layer in model.model.layers:
        h = layer.register_forward_hook(lambda m, a, k, o: a[0] if a else k["hidden_states"], with_kwargs=True)
        skipped.append(_lm_loss(model(input_ids=tokens, use_cache=False).logits, tokens))
        h.remove()
    return ref.result(lm_loss, skipped)


@pytest.fixture(scope="module")
def references(setup) -> dict[str, dict[str, torch.Tensor]]:
    return {f: hf_reference(setup["hf"][f], setup["tokens"], mtp=f == "qwen3_next") for f in FAMILIES}


def assert_matches(ours: Importance, ref: dict[str, torch.Tensor], where: str, tol: float = 2e-5) -> None:
    """Counts exactly, the rest to float32 accuracy (the Megatron model runs in float32, the reference in float64)."""
    assert sorted(ours.tensors) == sorted(ref), (where, sorted(set(ours.tensors) ^ set(ref)))
    assert ours.tokens == SEQS * SEQ_LEN
    for name, want in ref.items():
        got = ours.tensors[name].double()
        if name.endswith(EXACT):
            assert torch.equal(got, want.float().double()), (where, name, got, want)
        else:
            torch.testing.assert_close(got, want.double(), rtol=tol, atol=tol / 10,
                                       msg=lambda m: f"{where} {name}: {m}")


# ---------------------------------------------------------------- end to end

def test_cli_from_hf_checkpoint_matches_float64_reference(setup, references, tmp_path):
    out = tmp_path / "imp.safetensors"
    proc = subprocess.run([sys.executable, "-m", "megatron_slim.cli", "importance", "--model",
                           str(setup["hf"]["qwen3_moe"]), "--data", str(setup["data"]), "--tokens", "60",
                           "--seq-len", str(SEQ_LEN), "--layer-loss", "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imp = Importance.load(out)
    assert_matches(imp, references["qwen3_moe"], "cli")
    assert imp.data == str(setup["data"]) and imp.options["sequences"] == SEQS and imp.model.family == "qwen3_moe"
    assert not out.with_name(out.name + ".mcore-tmp").exists(), "the on-the-fly conversion is removed"
    freq = imp.get("layers.0.experts.frequency")
    assert freq.sum().item() == pytest.approx(imp.model.topk)
    assert torch.allclose(imp.get("layers.0.experts.coactivation").diagonal(), freq)


def importance_sweep(rank: int, world: int, jobs: list[tuple[str, str, dict, str]]) -> None:
    """`importance` at several layouts in one set of processes (process start-up dominates on small machines)."""
    from megatron_slim.commands import importance as cmd
    from megatron_slim.engines.importance_job import importance_worker

    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    for model, data, layout, out in jobs:
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in layout.items()]
        argv = ["--model", model, "--data", data, "--tokens", str(SEQS * SEQ_LEN), "--seq-len", str(SEQ_LEN),
                "--layer-loss", "--no-progress", "--out", out, *flags]
        importance_worker(cmd.job(parser.parse_args(argv)))


def run_sweep(setup: dict) -> dict[tuple[str, str], Path]:
    """Convert each family once, then run every layout in one set of 4 processes; {(family, layout): file}."""
    from megatron_slim.checkpoint.convert import hf_to_mcore

    root, jobs, outs = setup["root"], [], {}
    for family in FAMILIES:
        mcore = root / f"{family}-mcore"
        hf_to_mcore(setup["hf"][family], mcore, progress=False)
        for name, layout in LAYOUTS.items():
            outs[family, name] = root / f"{family}-{name}.safetensors"
            jobs.append((str(mcore), str(setup["data"]), layout, str(outs[family, name])))
    run_distributed(importance_sweep, 4, jobs, timeout_s=600)
    return outs


@pytest.fixture(scope="module")
def sweep(setup) -> dict[tuple[str, str], Path]:
    return run_sweep(setup)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_layout_matches_float64_reference(sweep, references, family, layout):
    imp = Importance.load(sweep[family, layout])
    assert imp.options["world"] == 4
    assert_matches(imp, references[family], f"{family}/{layout}")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layouts_agree_with_tp1(sweep, family):
    tp1 = Importance.load(sweep[family, "ep2"]).tensors
    for layout in LAYOUTS:
        assert_matches(Importance.load(sweep[family, layout]), tp1, f"{family}/{layout} vs TP=1", tol=1e-5)


# ---------------------------------------------------------------- calibration data and token budgets

def test_token_windows_join_documents_with_eos(tmp_path):
    docs = random_docs(6, seed=1)
    docs[2] = docs[2] + [EOS]  # already terminated: no second EOS
    path = write_jsonl(tmp_path / "d.jsonl", [{"tokens": d} for d in docs])
    path.write_text(path.read_text().replace("\n", "\n\n", 1))  # blank lines are skipped
    total = sum(len(d) for d in docs) + 5
    got = calibration_windows(path, 8, 100, EOS)
    assert torch.equal(got, expected_windows(docs, 8, total // 8))
    assert torch.equal(calibration_windows(path, 8, 2, EOS), got[:2])


def test_text_jsonl_uses_the_checkpoint_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>", "the", "cat", "sat", "on", "mat", "a", "dog"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(tmp_path / "tk")
    texts = ["the cat sat on the mat", "a dog sat", "the dog"]
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    assert eos_token_id({}, tmp_path / "tk") == 1
    ids = [[words.index(w) for w in t.split()] for t in texts]
    assert torch.equal(calibration_windows(path, 4, 3, 1, tmp_path / "tk"), expected_windows(ids, 4, 3))
    with pytest.raises(UserError, match="needs a tokenizer"):
        calibration_windows(path, 4, 1, 1)


def test_megatron_indexed_dataset_gives_the_same_windows(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    docs = random_docs(8, seed=2)
    prefix = str(tmp_path / "corpus_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for doc in docs:  # two index sequences per document: documents, not sequences, are EOS-joined
        half = len(doc) // 2
        builder.add_document(torch.tensor(doc), [half, len(doc) - half])
    builder.finalize(prefix + ".idx")
    jsonl = write_jsonl(tmp_path / "same.jsonl", [{"tokens": d} for d in docs])
    want = calibration_windows(jsonl, 8, 6, EOS)
    for path in (prefix, prefix + ".bin"):
        assert torch.equal(calibration_windows(path, 8, 6, EOS), want)


def test_data_and_eos_errors(tmp_path):
    with pytest.raises(UserError, match="indexed dataset prefix"):
        calibration_windows(tmp_path / "nothing", 8, 1, EOS)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"ids": [1, 2]}])
    with pytest.raises(UserError, match="bad.jsonl:1: expected"):
        calibration_windows(bad, 8, 1, EOS)
    with pytest.raises(UserError, match="EOS"):
        eos_token_id({}, None)
    assert eos_token_id({"eos_token_id": [7, 8]}, None) == 7


def test_token_budget_rounding():
    assert sequence_count(64, 16, 4) == 4
    assert sequence_count(65, 16, 4) == 8  # up to whole steps of DP ranks x micro-batch
    assert sequence_count(65, 16, 4, max_tokens=100) == 4  # ...unless that passes the budget
    with pytest.raises(UserError, match="max-tokens"):
        sequence_count(64, 16, 4, max_tokens=63)


def test_cli_input_errors(setup, tmp_path):
    from megatron_slim.commands import importance as cmd

    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    hf, data = str(setup["hf"]["qwen3_next"]), str(setup["data"])
    existing = tmp_path / "x.safetensors"
    existing.write_text("")
    cases = [(["--model", hf, "--data", data, "--out", str(existing)], FileExistsError, "exists"),
             (["--model", str(tmp_path), "--data", data, "--out", "o"], UserError, "neither a Megatron"),
             (["--model", hf, "--data", str(tmp_path / "x.jsonl"), "--out", "o"], FileNotFoundError, "does not exist"),
             (["--model", hf, "--data", data, "--out", "o", "--ep", "3"], UserError, "num_experts=8"),
             (["--model", hf, "--data", data, "--out", "o", "--seq-len", "1"], UserError, "seq-len")]
    for argv, error, match in cases:
        with pytest.raises(error, match=match):
            cmd.run(parser.parse_args(["--tokens", "64", *argv]))
