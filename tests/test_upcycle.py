"""Dense Llama -> Mixtral upcycling: exactness at top-k = E, graceful loss below it, balanced splits, determinism."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, MixtralForCausalLM

from megatron_slim.compress.upcycle_ffn import expert_output_norms, neuron_activations, upcycle_ffn
from megatron_slim.engines import upcycle_job
from megatron_slim.engines.upcycle_job import capture_ffn_inputs, upcycle_model
from support.hf_checkpoints import byte_tokenizer

EXPERTS = 4


def tiny_llama(seed: int = 0, vocab_size: int = 128, tied: bool = False) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.1, tie_word_embeddings=tied)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def random_sequences(count: int, length: int, vocab_size: int = 128, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(vocab_size, (length,), generator=gen) for _ in range(count)]


def logits(model: torch.nn.Module, sequences: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(ids.unsqueeze(0)).logits[0] for ids in sequences])


@pytest.fixture(scope="module")
def dense() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def calibration() -> list[torch.Tensor]:
    return random_sequences(8, 64)


@pytest.fixture(scope="module")
def heldout() -> list[torch.Tensor]:
    return random_sequences(4, 48, seed=2)


def random_ffn(hidden: int = 32, neurons: int = 64, tokens: int = 512, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    gate, up = torch.randn(neurons, hidden, generator=gen), torch.randn(neurons, hidden, generator=gen)
    down = torch.randn(hidden, neurons, generator=gen)
    return gate, up, down, torch.randn(tokens, hidden, generator=gen)


def test_batched_capture_keeps_every_token_in_order(dense, monkeypatch) -> None:
    """Sequences of different lengths, right-padded in batches: each layer's FFN inputs are the real tokens'
    only, in the sequences' order, and equal to forwarding each sequence alone."""
    gen = torch.Generator().manual_seed(3)
    sequences = [torch.randint(128, (n,), generator=gen) for n in (5, 17, 9, 17, 3, 12)]
    monkeypatch.setattr(upcycle_job, "CAPTURE_BATCH_TOKENS", 40)  # batches of 2, 3 and 1 sequences
    batched = capture_ffn_inputs(dense, sequences)
    monkeypatch.setattr(upcycle_job, "CAPTURE_BATCH_TOKENS", 1)  # one sequence per forward
    alone = capture_ffn_inputs(dense, sequences)
    assert len(batched) == len(dense.model.layers)
    for got, want in zip(batched, alone):
        assert got.shape == (sum(map(len, sequences)), dense.config.hidden_size)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_stay_tied(tmp_path: Path) -> None:
    """A dense model with tied embeddings (SmolLM2) upcycles into a tied Mixtral whose checkpoint holds one matrix:
    a second, untied head is refused by the conversion to Megatron (a tensor the mapping does not consume)."""
    from safetensors import safe_open

    moe = upcycle_model(tiny_llama(tied=True), random_sequences(4, 16), 2, 2)
    assert moe.lm_head.weight is moe.model.embed_tokens.weight
    moe.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in set(f.keys())


def test_split_is_balanced_permutation_and_experts_sum_to_dense_ffn() -> None:
    gate, up, down, x = random_ffn()
    moe = upcycle_ffn(gate.requires_grad_(), up, down, x, EXPERTS, top_k=EXPERTS)
    assert not any(t.requires_grad for t in (moe.gate, moe.up, moe.down, moe.router))  # no autograd graph kept
    assert moe.groups.shape == (EXPERTS, 64 // EXPERTS)
    assert torch.equal(moe.groups.flatten().sort().values, torch.arange(64))
    assert moe.gate.shape == moe.up.shape == (EXPERTS, 16, 32) and moe.down.shape == (EXPERTS, 32, 16)
    experts = torch.stack([(F.silu(x @ g.T) * (x @ u.T)) @ d.T for g, u, d in zip(moe.gate, moe.up, moe.down)])
    dense = (F.silu(x @ gate.T) * (x @ up.T)) @ down.T
    # experts carry a factor top_k = E, which uniform routing weights 1/E cancel
    torch.testing.assert_close(experts.mean(0), dense, rtol=1e-5, atol=1e-4)


def test_router_ranks_experts_by_output_mass() -> None:
    gate, up, down, x = random_ffn(tokens=2048)
    moe = upcycle_ffn(gate, up, down, x, EXPERTS, top_k=2)
    heaviest = expert_output_norms(neuron_activations(x, gate, up), down, moe.groups).argmax(1)
    agreement = ((x @ moe.router.T).argmax(1) == heaviest).float().mean().item()
    assert agreement > 2 / EXPERTS  # chance is 1/E


def test_topk_equal_to_experts_reproduces_dense_logits(dense, calibration, heldout) -> None:
    expected = logits(dense, heldout)
    exact = upcycle_model(dense, calibration, EXPERTS, EXPERTS, router_scale=0.0)
    assert isinstance(exact, MixtralForCausalLM)
    assert exact.config.intermediate_size == 64 // EXPERTS and exact.config.num_local_experts == EXPERTS
    torch.testing.assert_close(logits(exact, heldout), expected, rtol=1e-5, atol=1e-5)
    # the default router (informative, logits scaled by 1e-3) moves the logits by O(1e-3)
    routed = upcycle_model(dense, calibration, EXPERTS, EXPERTS)
    torch.testing.assert_close(logits(routed, heldout), expected, rtol=0, atol=2e-3)


def soft_cross_entropy(teacher: torch.Tensor, student: torch.Tensor) -> float:
    """Cross-entropy to the dense model's distribution: its entropy plus KL, so minimal exactly at the dense model."""
    return -(teacher.softmax(-1) * student.log_softmax(-1)).sum(-1).mean().item()


def test_smaller_topk_costs_loss_but_stays_finite(dense, calibration, heldout) -> None:
    teacher = logits(dense, heldout)
    losses = {k: soft_cross_entropy(teacher, logits(upcycle_model(dense, calibration, EXPERTS, k), heldout))
              for k in range(EXPERTS, 0, -1)}
    assert losses[EXPERTS] == pytest.approx(soft_cross_entropy(teacher, teacher), abs=1e-4)
    for k in range(1, EXPERTS):
        assert math.isfinite(losses[k]) and losses[k] > losses[EXPERTS] + 1e-3


def test_deterministic_for_a_seed(dense, calibration) -> None:
    first = upcycle_model(dense, calibration, EXPERTS, 2, seed=3).state_dict()
    second = upcycle_model(dense, calibration, EXPERTS, 2, seed=3).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dense checkpoint with tokenizer files, as the CLI expects (vocabulary: 256 bytes and EOS)."""
    directory = tmp_path_factory.mktemp("dense")
    tiny_llama(vocab_size=258).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


def test_cli_writes_a_mixtral_checkpoint(dense_dir: Path, tmp_path: Path) -> None:
    from megatron_slim.cli import main

    argv = ["upcycle", "--dense", str(dense_dir), "--experts", str(EXPERTS), "--topk", str(EXPERTS),
            "--out", str(tmp_path / "moe"), "--calib-tokens", "512", "--router-scale", "0"]
    assert main(argv) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "moe").iterdir()}
    moe = MixtralForCausalLM.from_pretrained(tmp_path / "moe").eval()
    text = random_sequences(2, 32, vocab_size=258, seed=5)
    torch.testing.assert_close(logits(moe, text), logits(tiny_llama(vocab_size=258), text), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("experts, topk", [(5, 2), (4, 5)])
def test_cli_rejects_bad_expert_counts(dense_dir: Path, tmp_path: Path, experts: int, topk: int,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from megatron_slim.cli import main

    argv = ["upcycle", "--dense", str(dense_dir), "--experts", str(experts), "--topk", str(topk),
            "--out", str(tmp_path / "moe"), "--calib-tokens", "512"]
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err and not (tmp_path / "moe").exists()


@pytest.mark.slow
def test_upcycled_smollm2_matches_the_teacher() -> None:
    """The embedded teacher upcycled to 8 experts at top-8: exact without router logits, and with the default
    router still the same next-token distributions and answer (about a minute on 2 cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_slim.data.assets import smollm2_hf_dir
    from megatron_slim.data.wiki import wiki_splits
    from megatron_slim.engines.upcycle_job import calibration_sequences

    directory = smollm2_hf_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    smollm2 = AutoModelForCausalLM.from_pretrained(directory).eval()
    calibration = calibration_sequences(tokenizer, wiki_splits().calibration, 2048)
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    expected = logits(smollm2, [prompt[0]])
    exact = upcycle_model(smollm2, calibration, 8, 8, router_scale=0.0)
    torch.testing.assert_close(logits(exact, [prompt[0]]), expected, rtol=0, atol=2e-4)
    routed = upcycle_model(smollm2, calibration, 8, 8)
    kl = F.kl_div(logits(routed, [prompt[0]]).log_softmax(-1), expected.log_softmax(-1), log_target=True,
                  reduction="batchmean")
    assert kl.item() < 1e-4
    with torch.no_grad():
        answer = routed.generate(prompt, max_new_tokens=2, do_sample=False)[0, prompt.shape[1]:]
    assert tokenizer.decode(answer).startswith(" Paris")
