"""megatron-slim: compress large MoE language models with pruning, expert merging and distillation."""
from pathlib import Path

from setuptools import find_packages, setup


def _requirements() -> list[str]:
    lines = Path(__file__).with_name("requirements.txt").read_text().splitlines()
    reqs = [ln.split("#")[0].strip() for ln in lines]
    return [r for r in reqs if r and not r.startswith("pytest")]


setup(
    name="megatron-slim",
    version="0.1.0",
    description="Megatron-Core toolkit for pruning, expert merging and distillation of MoE LLMs",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.12,<3.13",
    packages=find_packages(include=["megatron_slim", "megatron_slim.*"]),
    package_data={"megatron_slim.demo": ["recipe.yaml"], "megatron_slim.eval.tasks": ["*.yaml"]},
    install_requires=_requirements(),
    extras_require={
        "te": ["transformer-engine[pytorch]"],
        "dev": ["pytest>=8.0"],
    },
    entry_points={"console_scripts": ["megatron-slim=megatron_slim.cli:main"]},
)
