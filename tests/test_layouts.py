"""Same weights, different layouts: TP=2, EP=2, TP2xEP2 and PP=2 reproduce TP=1's logits and loss.

The weights travel through a megatron-core distributed checkpoint saved at TP=1 and loaded at each layout (4 gloo
processes; the remaining ranks are data-parallel replicas, which must agree too).
"""
import pytest
import torch
import torch.nn.functional as F

from support import tiny_models
from support.dist import run_distributed
from support.workers import layout_sweep

LAYOUTS = {"tp2": {"tp": 2}, "ep2": {"ep": 2}, "tp2ep2": {"tp": 2, "ep": 2}, "pp2": {"pp": 2}}
FAMILIES = sorted(tiny_models.FAMILIES)
TOKENS = torch.randint(0, tiny_models.VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return run_distributed(layout_sweep, 4, FAMILIES, LAYOUTS, TOKENS, str(tmp_path_factory.mktemp("ckpt")),
                           timeout_s=600)


def _loss(logits: torch.Tensor) -> float:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), TOKENS[:, 1:].reshape(-1)).item()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_layout_matches_tp1(sweep, family, layout):
    ref = sweep[0][family]["tp1"]
    outs = [r[family][layout] for r in sweep if r[family][layout] is not None]
    assert len(outs) == (2 if layout == "pp2" else 4), "every last-stage rank returns logits"
    for logits in outs:
        assert logits.shape == ref.shape
        torch.testing.assert_close(logits, ref, rtol=0, atol=2e-5)
        assert torch.equal(logits.argmax(-1), ref.argmax(-1))
        assert abs(_loss(logits) - _loss(ref)) < 1e-5
