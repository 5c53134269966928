"""megatron-slim: compress large MoE language models with pruning, expert merging and distillation.

`install_requires` are compatible ranges, so that installing into an environment that already has torch,
Transformer Engine and apex (NVIDIA's PyTorch containers) keeps them (tests/test_install.py); the exact versions
`make demo`/`make test` install are pinned in constraints.txt. Verified: the CPU suite on torch 2.14.1 and
megatron-core 0.19.2. The torch floor is 2.11, the GPU image's torch that scripts/gpu_check.sh is built for
(README, "On a GPU cluster", says whether it has run). megatron-core 0.19 needs Python >= 3.12; no upper cap.
"""
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="megatron-slim",
    version="0.1.0",
    description="Megatron-Core toolkit for pruning, expert merging and distillation of MoE LLMs",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.12",
    packages=find_packages(include=["megatron_slim", "megatron_slim.*"]),
    package_data={"megatron_slim.demo": ["recipe.yaml"], "megatron_slim.eval.tasks": ["*.yaml"]},
    install_requires=[
        "torch>=2.11.0a0",  # a0: NVIDIA containers build 2.11 as 2.11.0a0+<commit>
        "megatron-core>=0.19.2,<0.20",
        "flash-linear-attention>=0.6,<0.7",
        "transformers>=5.0,<6",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "numpy>=1.26",
        "wandb>=0.18",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "psutil>=5.9",
        "matplotlib>=3.8",
        "gguf>=0.10",
        "accelerate>=1.0",
        "lm-eval>=0.4.13,<0.5",  # benchmarks through lm-evaluation-harness (evaluate --tasks)
        "pyarrow>=15",  # preprocess: parquet and HF datasets.save_to_disk inputs
        "zstandard>=0.22",  # preprocess: .jsonl.zst inputs
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]"],
        # ruff: `make lint` (rules in pyproject.toml); pytest-xdist: `make test` runs the tests in PYTEST_WORKERS processes
        "dev": ["pytest>=8.0", "pytest-xdist>=3.5", "ruff>=0.17,<0.18"],
    },
    entry_points={"console_scripts": ["megatron-slim=megatron_slim.cli:main"]},
)
