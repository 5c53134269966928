"""HF <-> Megatron-Core conversion: logit parity with transformers at several layouts (MTP included), exact
round trips, and clear errors on corrupt input that leave no complete-looking output behind."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_slim.checkpoint.readahead import ReadAhead
from megatron_slim.models import transforms
from megatron_slim.models.mapping import bind_rules
from megatron_slim.models.registry import FAMILIES, model_config_from_hf
from support import tiny_models
from support.dist import run_distributed
from support.hf_checkpoints import build_tiny_hf, random_mtp_tensors, read_tensors, saved_shapes, write_shard
from support.workers import verify_sweep

LAYOUTS = {"tp1": {}, "tp2": {"tp": 2}, "ep2": {"ep": 2}, "pp2": {"pp": 2}}
TOKENS = torch.randint(0, tiny_models.VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "megatron_slim.cli", *args], capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode:
        raise AssertionError(f"megatron-slim {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc


def save_hf(family: str, out: Path, seed: int = 0, **over) -> Path:
    """A tiny random HF checkpoint, sharded, with non-trivial norm weights (and MTP for Qwen3-Next)."""
    model = build_tiny_hf(tiny_models.FAMILIES[family](**over), seed)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # random init leaves norms at 0/1, which would hide norm-convention mistakes
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    model.save_pretrained(out, max_shard_size="300KB")
    if family == "qwen3_next":
        write_shard(out, random_mtp_tensors(model, saved_shapes(out), seed + 1, mtp_layers=1))
    return out


@pytest.fixture(scope="module", params=sorted(tiny_models.FAMILIES))
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    hf = save_hf(request.param, root / "hf")
    cli("convert", "hf-to-mcore", "--hf", str(hf), "--out", str(root / "mcore"), "--no-progress")
    return request.param, hf, root


def test_logit_parity_with_transformers_at_layouts(converted):
    family, hf, root = converted
    per_rank = run_distributed(verify_sweep, 4, str(hf), str(root / "mcore"), LAYOUTS, TOKENS, timeout_s=600)
    reported = [layout for r in per_rank for layout in r]
    assert sorted(reported) == sorted(LAYOUTS), "exactly one reporting rank per layout"
    for layout, report in ((k, v) for r in per_rank for k, v in r.items()):
        heads = ["main", "mtp1"] if family == "qwen3_next" else ["main"]
        assert sorted(k for k in report) == sorted(heads), (layout, report)
        for head in heads:
            m = report[head]
            assert m["max_abs_diff"] <= 1e-4 and m["top1_agreement"] == 1.0, (layout, head, m)


def test_round_trip_is_bit_exact(converted):
    family, hf, root = converted
    back = root / "back"
    cli("convert", "mcore-to-hf", "--mcore", str(root / "mcore"), "--out", str(back), "--no-progress",
        "--overwrite")
    a, b = read_tensors(hf), read_tensors(back)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert json.loads((back / "config.json").read_text())["architectures"] == \
        json.loads((hf / "config.json").read_text())["architectures"]
    assert (back / "generation_config.json").is_file()
    if family != "qwen3_next":  # transformers has no MTP module: it loads the rest and drops mtp.*
        from transformers import AutoModelForCausalLM
        ref = AutoModelForCausalLM.from_pretrained(hf).eval()
        got = AutoModelForCausalLM.from_pretrained(back).eval()
        with torch.no_grad():
            assert torch.equal(ref(TOKENS).logits, got(TOKENS).logits)


def test_mcore_to_hf_imports_neither_dynamo_nor_dcp(converted, tmp_path):
    """Start-up is most of a conversion's CPU time: planning from shape functions and reading the metadata as records
    keeps torch._dynamo (imported by the first meta-tensor cat) and torch.distributed.checkpoint out of it."""
    family, _, root = converted
    if family != "qwen3_next":  # the family whose mapping uses every transform
        pytest.skip("one family suffices")
    code = ("import sys; from megatron_slim.checkpoint.convert import mcore_to_hf; "
            f"mcore_to_hf({str(root / 'mcore')!r}, {str(tmp_path / 'hf')!r}, progress=False); "
            "print(sorted(m for m in ('torch._dynamo', 'torch.distributed.checkpoint') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


def test_tied_embeddings_round_trip(tmp_path):
    hf = save_hf("qwen3_moe", tmp_path / "hf", tie_word_embeddings=True)
    assert "lm_head.weight" not in read_tensors(hf)
    cli("convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "mc"), "--no-progress")
    cli("convert", "mcore-to-hf", "--mcore", str(tmp_path / "mc"), "--out", str(tmp_path / "back"), "--no-progress")
    a, b = read_tensors(hf), read_tensors(tmp_path / "back")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_dry_run_writes_nothing_and_counts(tmp_path):
    hf = save_hf("mixtral", tmp_path / "hf")
    proc = cli("convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "mc"), "--dry-run")
    n_params = sum(t.numel() for t in read_tensors(hf).values())
    assert f"{n_params / 1e9:.3f}B parameters" in proc.stdout
    assert not (tmp_path / "mc").exists() and not (tmp_path / "mc.partial").exists()


def _shards(hf: Path) -> list[Path]:
    return sorted(hf.glob("model-*.safetensors"))


def _corrupt_truncate(hf: Path) -> str:
    shard = _shards(hf)[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    return "truncated"


def _corrupt_missing_shard(hf: Path) -> str:
    _shards(hf)[0].unlink()
    return "shards named in model.safetensors.index.json are missing"


def _corrupt_shape(hf: Path) -> str:
    shard = _shards(hf)[0]
    tensors = load_file(shard)
    key = next(k for k in tensors if k.endswith("o_proj.weight"))
    tensors[key] = tensors[key][:, :-8].contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})
    return "shape mismatch"


def _corrupt_arch(hf: Path) -> str:
    cfg = json.loads((hf / "config.json").read_text())
    cfg["architectures"] = ["DeepseekV3ForCausalLM"]
    (hf / "config.json").write_text(json.dumps(cfg))
    return "unsupported architecture"


def _corrupt_extra_key(hf: Path) -> str:
    write_shard(hf, {"model.layers.0.mystery.weight": torch.zeros(4)})
    return "not consumed"


@pytest.mark.parametrize("corrupt", [_corrupt_truncate, _corrupt_missing_shard, _corrupt_shape, _corrupt_arch,
                                     _corrupt_extra_key])
def test_corrupt_input_fails_clearly_and_leaves_no_output(tmp_path, corrupt):
    hf = save_hf("qwen3_moe", tmp_path / "hf")
    message = corrupt(hf)
    proc = cli("convert", "hf-to-mcore", "--hf", str(hf), "--out", str(tmp_path / "mc"), check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "mc").exists() and not (tmp_path / "mc.partial").exists()


def test_read_ahead_waits_within_its_window_and_stops_with_its_block(tmp_path):
    """A consumer that stops early (window exhausted, thread waiting) or reads everything leaves no thread behind."""
    data = tmp_path / "data"
    data.write_bytes(bytes(4 << 20))
    with ReadAhead([(data, 0, 2 << 20), (data, 2 << 20, 2 << 20)], window=0):
        pass
    with ReadAhead([(data, 0, 4 << 20)], window=1 << 20) as read_ahead:
        for _ in range(4):
            read_ahead.consumed(1 << 20)
    assert not [t for t in threading.enumerate() if t.name == "read-ahead"]


def _specs(tensors: list[torch.Tensor]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [(tuple(t.shape), t.dtype) for t in tensors]


def _outcome(fn, *args):
    """fn's output specs, or None where it raises as a transform on bad shapes does."""
    try:
        out = fn(*args)
    except (RuntimeError, ValueError, IndexError):
        return None
    return [o if isinstance(o, tuple) else (tuple(o.shape), o.dtype) for o in out]


def _misshapen(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Shapes a config/weight disagreement could give a tensor: one dimension off by one or doubled, a dimension
    dropped or added."""
    out = [shape[:-1], (*shape, 2)]
    for j in range(len(shape)):
        out += [(*shape[:j], shape[j] + 1, *shape[j + 1:]), (*shape[:j], 2 * shape[j], *shape[j + 1:])]
    return out


@pytest.mark.parametrize("family", sorted(tiny_models.FAMILIES))
def test_shape_functions_agree_with_the_transforms(family, tmp_path):
    """Converters plan and check from the shape functions alone (no transform runs on meta tensors): on real
    tensors they must give the transforms' output shapes and dtypes exactly, each way; on misshapen inputs they
    must fail wherever the transform fails and never answer differently from it; a `slots` transform's to_hf must
    return exactly its slot views (mcore-to-hf copies those byte ranges file to file)."""
    over = {"linear_value_head_dim": 24} if family == "qwen3_next" else {}  # no two GDN dimensions alike
    hf = {k: v.to(torch.bfloat16) for k, v in read_tensors(save_hf(family, tmp_path / "hf", **over)).items()}
    cfg = model_config_from_hf(tmp_path / "hf")
    cfg.hf_config["dtype"] = "bfloat16"
    seen = set()
    for rule in bind_rules(FAMILIES[cfg.family].mapping, cfg):
        t = rule.transform
        seen.add(t.name)
        inputs = [hf[k] for k in rule.hf]
        mcore = t.to_mcore(inputs, cfg)
        assert t.mcore_specs(_specs(inputs), cfg) == _specs(mcore), (rule.where, t.name)
        back = t.to_hf(mcore, cfg)
        assert t.hf_specs(_specs(mcore), cfg) == _specs(back), (rule.where, t.name)
        assert all(torch.equal(a, b) for a, b in zip(inputs, back, strict=True)), (rule.where, t.name)
        if t.slots is not None:
            (stack,) = mcore
            _, views = t.slots(inputs, cfg, lambda shape, dtype: stack)
            assert [(v.data_ptr(), v.shape, v.stride()) for v in views] == \
                [(o.data_ptr(), o.shape, o.stride()) for o in back] and all(v.is_contiguous() for v in views)
        for run, shapes_of, given in ((t.to_mcore, t.mcore_specs, inputs), (t.to_hf, t.hf_specs, mcore)):
            for i, x in enumerate(given):
                for shape in _misshapen(tuple(x.shape)):
                    metas = [torch.empty(shape if j == i else y.shape, dtype=y.dtype, device="meta")
                             for j, y in enumerate(given)]
                    want, got = _outcome(run, metas, cfg), _outcome(shapes_of, _specs(metas), cfg)
                    assert got is None or got == want, (rule.where, t.name, i, shape, got, want)
                    assert want is not None or got is None, (rule.where, t.name, i, shape)
    defined = {v.name for v in vars(transforms).values() if isinstance(v, transforms.Transform)}
    assert seen <= defined and (family != "qwen3_next" or seen == defined), defined - seen
