"""FP8 configuration, without Transformer Engine (its wheels need CUDA): refusals here, pass-through when simulated.

What this can verify: without TE, FP8 is refused up front with a message naming Transformer Engine (BuildOptions
through transformer_config / build_model, and a run config through `megatron-slim train`); the run config refuses
unknown FP8 formats; with TE and a GPU simulated, our options reach megatron-core's TransformerConfig unchanged
(fp8, fp8_recipe, the TE backend, grouped GEMM) and pass its __post_init__ validation.

What it cannot: building a TE model, FP8 numerics and amax/scaling state, which recipes a given TE version and GPU
support at run time (mxfp8 needs Blackwell; megatron-core does not check recipes against hardware at config time),
or checkpoint round trips of FP8 runs. Those need a GPU with TE installed.

The simulation touches only the environment boundary: our `have_transformer_engine()`, `torch.cuda.is_available()`
and the TE version megatron-core reads (`megatron.core.utils._te_version`, its cache of the installed version):
megatron-core's __post_init__ refuses MoE FP8 unless transformer-engine >= 1.7 (>= 1.11 with grouped GEMM) is
installed, which `test_megatron_core_itself_requires_te_for_moe_fp8` pins down.
"""
from __future__ import annotations

import contextlib

import megatron.core.utils as mcore_utils
import pytest
import torch
from packaging.version import Version

from megatron_slim.errors import UserError
from megatron_slim.models import specs
from megatron_slim.models.builder import BuildOptions, build_model, transformer_config
from megatron_slim.models.registry import model_config_from_hf
from megatron_slim.runtime.layout import ParallelLayout
from megatron_slim.train.config import run_config_from_dict
from megatron_slim.train.data import write_indexed_dataset
from support import tiny_models
from support.hf_checkpoints import build_tiny_hf
from support.train_assets import cli, convert, write_config

SIMULATED_TE = "2.8.0"
NO_TE_HERE = pytest.mark.skipif(torch.cuda.is_available() and specs.have_transformer_engine(),
                                reason="Transformer Engine and a GPU are present: FP8 is not refused")
FORMATS, RECIPES = ("e4m3", "hybrid"), ("delayed", "tensorwise")


@pytest.fixture(scope="module")
def model_cfg():
    return model_config_from_hf(tiny_models.qwen3_moe())


@contextlib.contextmanager
def te_and_gpu_simulated(monkeypatch: pytest.MonkeyPatch, te_version: str | None = SIMULATED_TE):
    """TE importable (at `te_version`, None = megatron-core's own probe) and a GPU present, for the block only."""
    with monkeypatch.context() as m:
        m.setattr(specs, "have_transformer_engine", lambda: True)
        m.setattr(torch.cuda, "is_available", lambda: True)
        if te_version is not None:
            m.setattr(mcore_utils, "_te_version", Version(te_version))
        yield


# ---- (a) refused on this machine --------------------------------------------------------------------------------
@NO_TE_HERE
@pytest.mark.parametrize("fp8", FORMATS)
def test_build_options_fp8_refused_without_te(model_cfg, fp8):
    opts = BuildOptions(fp8=fp8)
    with pytest.raises(RuntimeError, match="FP8 needs Transformer Engine"):
        transformer_config(model_cfg, ParallelLayout(), opts)
    with pytest.raises(RuntimeError, match="FP8 needs Transformer Engine"):
        build_model(model_cfg, ParallelLayout(), opts)  # refused before any parallel state or module is touched


@pytest.mark.skipif(specs.have_transformer_engine(), reason="Transformer Engine is installed")
def test_forcing_the_te_backend_names_transformer_engine(model_cfg):
    with pytest.raises(RuntimeError, match="Transformer Engine is not installed"):
        transformer_config(model_cfg, ParallelLayout(), BuildOptions(transformer_impl="transformer_engine"))


def _run_dict(fp8: str | None) -> dict:
    return {"model": {"checkpoint": "ckpt"}, "data": {"blend": [[1.0, "data"]]},
            "checkpoint": {"save_dir": "out"}, "train": {"train_iters": 1}, "loss": {"kd_weight": 0.0},
            "precision": {"fp8": fp8}}


@pytest.mark.parametrize("fp8", ["e5m2", "fp8", "E4M3", "mxfp8"])
def test_run_config_refuses_unknown_fp8_formats(fp8):
    with pytest.raises(UserError, match=f"precision.fp8 must be e4m3 or hybrid, not '{fp8}'"):
        run_config_from_dict(_run_dict(fp8)).validate()


@pytest.mark.parametrize("fp8", [None, *FORMATS])
def test_run_config_accepts_known_fp8_formats(fp8):
    run_config_from_dict(_run_dict(fp8)).validate()


@NO_TE_HERE
def test_train_with_fp8_refused_without_te(tmp_path):
    """The run config's precision.fp8 reaches the model build and stops the run before any step."""
    convert(build_tiny_hf(tiny_models.qwen3_moe(num_hidden_layers=2), 1), tmp_path, "student")
    write_indexed_dataset(([i % 120 for i in range(j, j + 40)] + [127] for j in range(64)), tmp_path / "data", 128)
    cfg = write_config(tmp_path, "fp8_run", teacher=False, precision={"fp8": "e4m3"}, train={"train_iters": 1})
    proc = cli("train", "--config", str(cfg), check=False)
    assert proc.returncode != 0
    assert "FP8 needs Transformer Engine on a GPU" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "fp8_run" / "metrics.jsonl").exists()


# ---- (b) pass-through with TE and a GPU simulated ---------------------------------------------------------------
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("fp8", FORMATS)
def test_fp8_options_reach_transformer_config(model_cfg, monkeypatch, fp8, recipe):
    with te_and_gpu_simulated(monkeypatch):
        tcfg = transformer_config(model_cfg, ParallelLayout(), BuildOptions(fp8=fp8, fp8_recipe=recipe))
    assert type(tcfg).__module__ == "megatron.core.transformer.transformer_config"
    assert (tcfg.fp8, tcfg.fp8_recipe) == (fp8, recipe)
    assert tcfg.transformer_impl == "transformer_engine"
    assert tcfg.moe_grouped_gemm is True


def test_no_fp8_unless_asked_with_te_simulated(model_cfg, monkeypatch):
    with te_and_gpu_simulated(monkeypatch):
        tcfg = transformer_config(model_cfg, ParallelLayout(), BuildOptions())
    assert tcfg.fp8 is None and tcfg.transformer_impl == "transformer_engine"


def test_megatron_core_itself_requires_te_for_moe_fp8(model_cfg, monkeypatch):
    """Why the simulation includes the TE version: megatron-core asks for the installed version itself."""
    with te_and_gpu_simulated(monkeypatch, te_version=None), \
            pytest.raises(ValueError, match="transformer-engine>=1.7.0 supports MoE FP8"):
        transformer_config(model_cfg, ParallelLayout(), BuildOptions(fp8="e4m3"))
    with te_and_gpu_simulated(monkeypatch, te_version="1.10.0"), \
            pytest.raises(ValueError, match="transformer-engine>=1.11.0 supports FP8 grouped gemm"):
        transformer_config(model_cfg, ParallelLayout(), BuildOptions(fp8="e4m3"))
