"""`megatron-slim evaluate`: metrics against float64 references on constructed logits; evaluate() at TP1/TP2/PP2/EP2
against transformers' logits, a literal greedy loop and a literal speculative-decoding loop of Qwen3-Next's MTP
head (float64, from the checkpoint's tensors); the CLI end to end on an HF checkpoint."""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_slim.data.calibration import calibration_windows
from megatron_slim.engines.evaluate_job import format_table
from megatron_slim.eval.metrics import acceptance_counts, acceptance_summary, draft_windows, lm_sums
from megatron_slim.eval.stats import mean_se, paired_difference
from support import tiny_models
from support.dist import run_distributed
from support.hf_checkpoints import build_tiny_hf, random_mtp_tensors, saved_shapes, write_shard

EOS, SEQ_LEN, WINDOWS = 1, 16, 3  # 3 windows: DP=2 ranks get 2 and 1 (+ a weight-0 copy)
PROMPTS, PROMPT_LEN, GEN, K = 3, 6, 12, 4
LAYOUTS = {"tp1": {}, "tp2": {"tp": 2}, "pp2": {"pp": 2}, "ep2": {"ep": 2}}  # 2 ranks each; the rest is DP


# ---------------------------------------------------------------- metrics on constructed tensors

def constructed_logits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [3, 10, 64], labels, mask) with exact ties: within a half of the vocabulary and across halves."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 10, 64, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, 64, (3, 10), generator=gen)
    logits[0, 0, [5, 40]] = logits[0, 0].max() + 1  # tie across TP=2 shards: id 5 wins
    logits[0, 1, [41, 60]] = logits[0, 1].max() + 1  # tie inside the second shard: id 41 wins
    labels[0, :2] = torch.tensor([5, 60])
    labels[1] = logits[1].argmax(-1)  # a fully correct row
    mask = (torch.rand(3, 10, generator=gen) > 0.3).long()
    return logits, labels, mask


def reference_sums(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[float, int, int]:
    keep = mask.bool()
    nll = F.cross_entropy(logits[keep].double(), labels[keep], reduction="sum").item()
    return nll, int(keep.sum()), int((logits[keep].argmax(-1) == labels[keep]).sum())


def test_lm_sums_match_float64_reference():
    logits, labels, mask = constructed_logits()
    want = reference_sums(logits, labels, mask)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        got = lm_sums(logits.to(dtype), labels, mask)
        assert got.loss == pytest.approx(want[0], rel=tol) and (got.tokens, got.correct) == want[1:]
    assert lm_sums(logits, labels, torch.zeros_like(mask)).tokens == 0
    assert lm_sums(logits, labels).tokens == labels.numel()


def literal_acceptance(drafts: torch.Tensor, targets: torch.Tensor) -> list[int]:
    """Per row, accept drafts one by one until the first miss; counts of rows accepting >= k drafts."""
    counts = [0] * drafts.shape[1]
    for row_d, row_t in zip(drafts.tolist(), targets.tolist()):
        accepted = 0
        while accepted < len(row_d) and row_d[accepted] == row_t[accepted]:
            accepted += 1
        for k in range(accepted):
            counts[k] += 1
    return counts


def test_acceptance_counts_and_draft_alignment():
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (2, 14), generator=gen)
    # depth j guesses token t+j+1 right with probability ~3/4, so chains of every length occur
    depth_ids = [torch.where(torch.rand(2, 14, generator=gen) < 0.75, tokens.roll(-j - 1, dims=1),
                             torch.randint(0, 50, (2, 14), generator=gen)) for j in range(1, K + 1)]
    first = 4
    drafts, targets = draft_windows(depth_ids, tokens, first)
    rows = [(b, t) for b in range(2) for t in range(first, 14 - K - 1)]
    assert drafts.tolist() == [[depth_ids[j][b, t].item() for j in range(K)] for b, t in rows]
    assert targets.tolist() == [[tokens[b, t + j + 2].item() for j in range(K)] for b, t in rows]
    want = literal_acceptance(drafts, targets)
    assert want[-1] > 0, "the constructed case must reach depth K"
    assert acceptance_counts(drafts, targets).tolist() == want
    weights = torch.tensor([1.0, 0.0] * (len(rows) // 2))
    assert acceptance_counts(drafts, targets, weights).tolist() == literal_acceptance(drafts[::2], targets[::2])
    summary = acceptance_summary(torch.tensor(want, dtype=torch.float64), len(rows))
    assert summary["acceptance"] == {k + 1: c / len(rows) for k, c in enumerate(want)}
    assert summary["mean_accepted"] == pytest.approx(sum(want) / len(rows))
    with pytest.raises(ValueError, match="no drafting position"):
        draft_windows(depth_ids, tokens[:, :first + K + 1], first)


def sharded_metrics(rank: int, world: int) -> tuple[float, int, int]:
    """lm_sums on this rank's half of the constructed logits (TP=2 over gloo)."""
    import torch.distributed as dist

    logits, labels, mask = constructed_logits()
    s = lm_sums(logits.chunk(world, dim=-1)[rank].float(), labels, mask, dist.group.WORLD)
    return s.loss, s.tokens, s.correct


# ---------------------------------------------------------------- noise: standard errors and paired differences

def test_mean_se_matches_the_statistics_module():
    gen = torch.Generator().manual_seed(4)
    values = (torch.randn(37, generator=gen, dtype=torch.float64) * 0.3 + 3.0).tolist()
    mean, se = mean_se(values)
    assert mean == pytest.approx(statistics.fmean(values), rel=1e-15)
    assert se == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)), rel=1e-12)
    assert mean_se(torch.tensor(values, dtype=torch.float32)) == pytest.approx((mean, se), rel=1e-6)
    one = mean_se([2.5])
    assert one[0] == 2.5 and math.isnan(one[1])  # one window: no spread to estimate
    assert mean_se([1.0, 1.0, 1.0]) == (1.0, 0.0)
    for bad in ([], [[1.0, 2.0]]):
        with pytest.raises(ValueError, match="non-empty 1-D"):
            mean_se(bad)


def test_paired_difference_matches_direct_formulas():
    gen = torch.Generator().manual_seed(5)
    windows = torch.randn(40, generator=gen, dtype=torch.float64) * 2 + 4  # between-window spread dominates
    noise = lambda: torch.randn(40, generator=gen, dtype=torch.float64) * 0.05  # noqa: E731
    a, b = (windows + noise()).tolist(), (windows + 0.1 + noise()).tolist()
    d = [x - y for x, y in zip(a, b)]
    got = paired_difference(a, b)
    assert (got.mean, got.se, got.n) == (pytest.approx(statistics.fmean(d), rel=1e-12),
                                         pytest.approx(statistics.stdev(d) / math.sqrt(40), rel=1e-12), 40)
    assert got.significant and abs(got.mean) > 2 * got.se
    # unpaired, the same 0.1 difference hides in the spread of the windows
    assert abs(mean_se(a)[0] - mean_se(b)[0]) < 2 * math.hypot(mean_se(a)[1], mean_se(b)[1])
    same = paired_difference(a, (torch.tensor(a) + noise()).tolist())
    assert not same.significant and abs(same.mean) <= 2 * same.se
    single = paired_difference([3.0], [1.0])
    assert (single.mean, single.n, single.significant) == (2.0, 1, False) and math.isnan(single.se)
    with pytest.raises(ValueError, match="same windows: got 40 and 39"):
        paired_difference(a, b[:-1])


# ---------------------------------------------------------------- a tiny Qwen3-Next whose MTP drafts are often right

def save_hf(out: Path, seed: int = 0) -> Path:
    """Random tiny Qwen3-Next + one MTP layer, shaped so that acceptance is neither 0 nor 1: the LM head is mostly
    rank one (a few tokens win, depending on the sign of one direction of the hidden state) and the MTP input
    projection passes the main hidden state through, so drafts often agree with the main head's greedy tokens."""
    model = build_tiny_hf(tiny_models.qwen3_next(eos_token_id=EOS), seed)
    gen = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():
        vocab, hidden = model.lm_head.weight.shape
        u = F.normalize(torch.randn(hidden, generator=gen), dim=0)
        scale = torch.zeros(vocab)
        scale[[12, 79, 33, 54]] = torch.tensor([1.0, -1.0, 0.7, -0.7])
        model.lm_head.weight.copy_(0.05 * torch.randn(vocab, hidden, generator=gen) + 5 * scale[:, None] * u)
    model.save_pretrained(out, max_shard_size="300KB")
    mtp = random_mtp_tensors(model, saved_shapes(out), seed + 1, mtp_layers=1)
    mtp["mtp.fc.weight"][:, hidden:] += torch.eye(hidden)
    write_shard(out, mtp)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    from megatron_slim.checkpoint.convert import hf_to_mcore

    root = tmp_path_factory.mktemp("evaluate")
    gen = torch.Generator().manual_seed(3)
    docs = [torch.randint(2, tiny_models.VOCAB, (int(n),), generator=gen).tolist()
            for n in torch.randint(5, 20, (8,), generator=gen)]
    data = root / "eval.jsonl"
    data.write_text("".join(json.dumps({"tokens": d}) + "\n" for d in docs))
    hf = save_hf(root / "hf")
    hf_to_mcore(hf, root / "mcore", progress=False)
    windows = calibration_windows(data, SEQ_LEN, WINDOWS, EOS)
    assert len(windows) == WINDOWS
    return {"root": root, "data": data, "hf": hf, "mcore": root / "mcore", "windows": windows,
            "prompts": windows[:PROMPTS, :PROMPT_LEN]}


# ---------------------------------------------------------------- the independent float64 reference

@torch.no_grad()
def reference(hf_dir: Path, windows: torch.Tensor, prompts: torch.Tensor) -> dict:
    """transformers in float64: LM sums from its logits; greedy tokens from a literal decoding loop; acceptance
    from a literal speculative loop that feeds each draft back (not the greedy token) into the next MTP depth."""
    from megatron_slim.verify.hf_reference import (
        load_hf_reference,
        mtp_reference_logits,
        reference_hidden,
        reference_logits,
    )

    model = load_hf_reference(hf_dir, dtype=torch.float64)
    logits = reference_logits(model, windows)
    loss, tokens, correct = reference_sums(logits[:, :-1], windows[:, 1:], torch.ones_like(windows[:, 1:]))
    window_losses = [F.cross_entropy(lg[:-1].double(), w[1:]).item() for lg, w in zip(logits, windows)]
    seqs = prompts.clone()
    for _ in range(GEN):
        seqs = torch.cat([seqs, reference_logits(model, seqs)[:, -1].argmax(-1, keepdim=True)], dim=1)
    counts, positions = [0] * K, 0
    for z in seqs:
        for t in range(PROMPT_LEN - 1, PROMPT_LEN + GEN - K - 1):
            context = z[:t + 2]  # the main head has just produced z[t + 1]
            accepted = 0
            for depth in range(1, K + 1):
                ctx = context[None]
                draft = mtp_reference_logits(hf_dir, ctx, reference_hidden(model, ctx), depth=depth)[0, t].argmax()
                if draft != z[t + depth + 1]:
                    break
                accepted += 1
                context = torch.cat([context, draft[None]])
            counts = [c + (k < accepted) for k, c in enumerate(counts)]
            positions += 1
    scores = []
    for seq, cont in scored_sequences(windows, seqs):
        row = torch.tensor(seq)
        logp = F.log_softmax(reference_logits(model, row[None])[0, :-1], dim=-1)
        labels = row[1:]
        scores.append((logp[-cont:].gather(-1, labels[-cont:, None]).sum().item(),
                       float((logp[-cont:].argmax(-1) == labels[-cont:]).all())))
    return {"tokens": tokens, "loss": loss / tokens, "window_losses": window_losses, "scores": scores,
            "loss_se": statistics.stdev(window_losses) / math.sqrt(len(window_losses)),
            "accuracy": correct / tokens, "greedy": seqs,
            "mtp_acceptance": {k: c / positions for k, c in enumerate(counts, start=1)},
            "mean_accepted": sum(counts) / positions, "mtp_positions": positions}


def scored_sequences(windows: torch.Tensor, greedy: torch.Tensor) -> list[tuple[list[int], int]]:
    """(token ids, continuation length) pairs for `score_sequences`: rows of several lengths with continuations of
    1 to 12 tokens (so a batch's rows need different positions), one a greedy continuation (argmax flag 1)."""
    return [(windows[0].tolist(), 5), (windows[1, :9].tolist(), 1), (greedy[0].tolist(), GEN),
            (windows[2, :13].tolist(), 12), (windows[0, :4].tolist(), 2)]


@pytest.fixture(scope="module")
def ref(setup) -> dict:
    return reference(setup["hf"], setup["windows"], setup["prompts"])


def assert_matches(got: dict, want: dict, where: str) -> None:
    assert got["tokens"] == want["tokens"] == WINDOWS * (SEQ_LEN - 1), where
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), where
    assert got["window_losses"] == pytest.approx(want["window_losses"], rel=1e-5), where
    assert got["loss"] == pytest.approx(statistics.fmean(got["window_losses"]), rel=1e-12), where
    assert got["loss_se"] == pytest.approx(want["loss_se"], rel=1e-4), where
    assert got["ppl"] == pytest.approx(math.exp(want["loss"]), rel=1e-5), where
    assert got["accuracy"] == want["accuracy"], where
    assert got["mtp_positions"] == want["mtp_positions"] == PROMPTS * (GEN - K), where
    assert {int(k): v for k, v in got["mtp_acceptance"].items()} == pytest.approx(want["mtp_acceptance"]), where
    assert got["mean_accepted"] == pytest.approx(want["mean_accepted"]), where


def test_reference_acceptance_is_informative(ref):
    rates = list(ref["mtp_acceptance"].values())
    assert 0 < rates[-1] and rates[0] < 1, rates  # every depth accepts sometimes, depth 1 not always
    assert rates == sorted(rates, reverse=True)


# ---------------------------------------------------------------- evaluate() at several layouts

def evaluate_sweep(rank: int, world: int, mcore: str, windows: torch.Tensor, prompts: torch.Tensor,
                   scored: list[tuple[list[int], int]]) -> dict:
    """Metrics at TP=2, then evaluate() and lm-eval's continuation scoring (of `scored`) at every layout in the
    same 2 processes (start-up dominates)."""
    from megatron_slim.checkpoint.mcore import load_model, load_model_config
    from megatron_slim.eval.generate import greedy_continuation
    from megatron_slim.eval.harness import score_sequences
    from megatron_slim.eval.heldout import evaluate
    from megatron_slim.models.builder import build_model
    from megatron_slim.runtime.distributed import init_model_parallel
    from megatron_slim.runtime.layout import ParallelLayout

    out = {"metrics": sharded_metrics(rank, world)}
    cfg = load_model_config(mcore)
    for name, layout in LAYOUTS.items():
        parallel = ParallelLayout(**layout)
        init_model_parallel(parallel, seed=100 + rank)
        model = build_model(cfg, parallel)
        load_model(model, mcore)
        out[name] = evaluate(model, cfg, windows, micro_batch=2, mtp_k=K, prompts=prompts, gen_tokens=GEN)
        out[name]["scores"] = score_sequences(model, [s for s, _ in scored], [c for _, c in scored], batch_size=3,
                                              micro_batch=2).tolist()
        if name == "tp2":
            out["greedy"] = greedy_continuation(model, prompts, GEN, micro_batch=2)
            out["no_mtp"] = evaluate(model, cfg, windows, micro_batch=1, mtp_k=0, prompts=prompts)
    return out


@pytest.fixture(scope="module")
def sweep(setup, ref) -> list[dict]:
    return run_distributed(evaluate_sweep, 2, str(setup["mcore"]), setup["windows"], setup["prompts"],
                           scored_sequences(setup["windows"], ref["greedy"]), timeout_s=300)


def test_vocab_parallel_metrics_match_float64_reference(sweep):
    want = reference_sums(*constructed_logits())
    for rank in sweep:
        loss, tokens, correct = rank["metrics"]
        assert loss == pytest.approx(want[0], rel=1e-6) and (tokens, correct) == want[1:]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_evaluate_matches_transformers_reference(sweep, ref, layout):
    for rank in sweep:  # every rank returns the reduced result
        assert_matches(rank[layout], ref, layout)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_continuation_scores_match_transformers_reference(sweep, ref, layout):
    """Only the continuation's logits are computed (the MTP block skipped, positions gathered across sequence-
    parallel ranks at TP2): the same log-likelihoods and greedy flags as transformers' full logits."""
    assert {flag for _, flag in ref["scores"]} == {0.0, 1.0}
    for rank in sweep:
        got = rank[layout]["scores"]
        assert [flag for _, flag in got] == [flag for _, flag in ref["scores"]], layout
        assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in ref["scores"]], rel=1e-5), layout


def test_layouts_agree_and_greedy_tokens_match(sweep, ref):
    tp1 = sweep[0]["tp1"]
    for layout in LAYOUTS:
        got = sweep[0][layout]
        assert got["loss"] == pytest.approx(tp1["loss"], rel=1e-6), layout
        assert got["window_losses"] == pytest.approx(tp1["window_losses"], rel=1e-6), layout
        assert all(r[layout]["window_losses"] == got["window_losses"] for r in sweep), layout  # same on every rank
        assert (got["accuracy"], got["mtp_acceptance"]) == (tp1["accuracy"], tp1["mtp_acceptance"]), layout
    assert all(torch.equal(r["greedy"], ref["greedy"]) for r in sweep)
    no_mtp = sweep[0]["no_mtp"]
    assert (no_mtp["mtp_acceptance"], no_mtp["mean_accepted"], no_mtp["loss"]) == ({}, None, pytest.approx(tp1["loss"]))


# ---------------------------------------------------------------- the command

def test_cli_json_from_hf_checkpoint_at_tp2(setup, ref, tmp_path):
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "megatron_slim.cli", "evaluate", "--model", str(setup["hf"]),
                           "--data", str(setup["data"]), "--tokens", str(WINDOWS * SEQ_LEN - 2), "--seq-len",
                           str(SEQ_LEN), "--mtp-prompts", str(PROMPTS), "--prompt-len", str(PROMPT_LEN),
                           "--gen-tokens", str(GEN), "--micro-batch", "2", "--tp", "2", "--json", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    assert_matches(printed, ref, "cli")
    assert f"loss       {printed['loss']:.4f} ± {printed['loss_se']:.4f} nats/token (standard error over 3 " \
        "windows)" in format_table(printed)
    assert printed["layout"] == {"tp": 2, "ep": 1, "pp": 1, "world": 2}  # spawned its own 2 ranks
    assert not out.with_name(out.name + ".mcore-tmp").exists(), "the on-the-fly conversion is removed"


def test_cli_input_errors(setup):
    import argparse

    from megatron_slim.commands import evaluate as cmd
    from megatron_slim.errors import UserError

    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    cases = [(["--gen-tokens", "4"], UserError, "must exceed --mtp-k"),
             (["--tp", "3"], UserError, "not divisible by tp=3"),
             (["--seq-len", "1"], UserError, "seq-len"),
             (["--data", str(setup["root"] / "missing.jsonl")], FileNotFoundError, "does not exist")]
    for extra, error, match in cases:
        with pytest.raises(error, match=match):
            cmd.run(parser.parse_args(["--model", str(setup["mcore"]), "--data", str(setup["data"]), "--tokens",
                                       "16", *extra]))
