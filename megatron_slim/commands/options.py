"""Flags several commands share, declared once so they read alike in every command's --help."""
from __future__ import annotations

import argparse


def add_layout_arguments(p: argparse.ArgumentParser, tp_help: str = "tensor-parallel size") -> None:
    """--tp, --ep, --pp: the model-parallel layout (remaining ranks are data-parallel)."""
    p.add_argument("--tp", type=int, default=1, help=tp_help)
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")


def add_model_data_arguments(p: argparse.ArgumentParser, use: str, tokens_help: str, required: bool = True) -> None:
    """--model, --data, --tokens of a command that runs a model over token windows of data (`use`: what for);
    `required=False` when the command has other work to do without data."""
    p.add_argument("--model", required=True,
                   help="Megatron checkpoint directory (model_config.json) or HF checkpoint directory")
    p.add_argument("--data", required=required,
                   help=f"{use} data: .jsonl with {{'text': ...}} or {{'tokens': [ids]}} per line, or a Megatron "
                        "indexed dataset prefix (.bin/.idx)")
    p.add_argument("--tokens", type=int, required=required, default=None if required else 0, help=tokens_help)
    add_nonfinite_argument(p)


def add_follow_symlinks_argument(p: argparse.ArgumentParser) -> None:
    """--follow-symlinks: read input files that link outside the input (`checkpoint/links.py`)."""
    p.add_argument("--follow-symlinks", action="store_true",
                   help="read files of an input that link outside it (a Hugging Face hub-cache snapshot's links into "
                        "its blobs/ are always read); refused by default, naming the link")


def add_nonfinite_argument(p: argparse.ArgumentParser) -> None:
    """--allow-nonfinite: use a model whose weights hold NaN/Inf (refused by default, naming the tensor)."""
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="load a model whose weights hold NaN or Inf (refused by default, naming the tensor)")
