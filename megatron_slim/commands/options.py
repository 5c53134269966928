"""Flags several commands share, declared once so they read alike in every command's --help, and the flags of a
job dataclass: each field declared with `runtime.config_loader.setting` is a flag of the same name, default and
help (`add_job_arguments`), read back into the job by `job_from_args`."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, TypeVar

from megatron_slim.runtime.layout import ParallelLayout

J = TypeVar("J")


def add_layout_arguments(p: argparse.ArgumentParser, tp_help: str = "tensor-parallel size") -> None:
    """--tp, --ep, --pp: the model-parallel layout (remaining ranks are data-parallel)."""
    p.add_argument("--tp", type=int, default=1, help=tp_help)
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")


def add_follow_symlinks_argument(p: argparse.ArgumentParser) -> None:
    """--follow-symlinks: read input files that link outside the input (`checkpoint/links.py`)."""
    p.add_argument("--follow-symlinks", action="store_true",
                   help="read files of an input that link outside it (a Hugging Face hub-cache snapshot's links into "
                        "its blobs/ are always read); refused by default, naming the link")


def _flag_fields(job: type) -> list[tuple[dataclasses.Field, Any]]:
    """The job's fields declared as flags (`setting`), with their resolved annotations."""
    hints = typing.get_type_hints(job)
    return [(f, hints[f.name]) for f in dataclasses.fields(job) if "help" in f.metadata]


def _scalar(hint: Any) -> tuple[Any, bool]:
    """(the value type of a flag's annotation, whether the field is a tuple of them); `X | None` reads as X."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return args[0], True
    return (args[0] if args and typing.get_origin(hint) is not None else hint), False


def _label(f: dataclasses.Field) -> str:
    """The flag's name (`--label`, or the positional argument's), also its argparse dest: the field's unless its
    `setting` names another."""
    return f.metadata.get("flag", f.name)


def add_job_arguments(p: argparse.ArgumentParser, job: type) -> None:
    """One flag per field of `job` declared with `setting`, in field order: `--field-name` (or the `flag` it names)
    with the field's default (a field without one is a required flag) and help; a bool is a switch (`--no-NAME`
    when it defaults to true), a ParallelLayout the --tp/--ep/--pp flags, a `positional` field an argument."""
    for f, hint in _flag_fields(job):
        meta = dict(f.metadata)
        text, many, label = meta.pop("help"), meta.pop("many", None), meta.pop("flag", f.name)
        positional, tp_help = meta.pop("positional", False), meta.pop("tp_help", "tensor-parallel size")
        if meta.pop("hidden", False):
            text = argparse.SUPPRESS
        required = f.default is dataclasses.MISSING
        default = None if required else f.default
        name = "--" + label.replace("_", "-")
        kind, _ = _scalar(hint)
        if hint is ParallelLayout:
            add_layout_arguments(p, tp_help=tp_help)
        elif positional:
            p.add_argument(label, type=kind, help=text, **meta)
        elif hint is bool:  # a switch that turns the default around
            p.add_argument(("--no-" + label.replace("_", "-")) if default else name, action="store_true", help=text)
        elif many == "append":  # a default of values stays out of argparse, which would append to it
            p.add_argument(name, action="append", required=required, default=[] if default == () else None,
                           help=text, **meta)
        elif many == "comma":
            p.add_argument(name, default="", help=text, **meta)
        else:
            p.add_argument(name, type=kind, required=required, default=default, help=text, **meta)


def job_from_args(job: type[J], args: argparse.Namespace, **given: Any) -> J:
    """The job from the flags `add_job_arguments` declared (`given`: the fields the command sets itself)."""
    values: dict[str, Any] = {}
    for f, hint in _flag_fields(job):
        if f.name in given:
            continue
        if hint is ParallelLayout:
            values[f.name] = ParallelLayout(tp=args.tp, ep=args.ep, pp=args.pp)
            continue
        if hint is bool and f.default is True:
            values[f.name] = not getattr(args, "no_" + _label(f))
            continue
        value, (kind, many) = getattr(args, _label(f)), _scalar(hint)
        if f.metadata.get("many") == "comma":
            value = tuple(v.strip() for v in value.split(",")) if value else ()
        elif many:
            value = f.default if value is None else tuple(kind(v) for v in value)
        values[f.name] = value
    return job(**values, **given)
