"""Parsed YAML -> nested dataclasses, one set of rules for recipes and run configs.

Rules, read from each field's annotation: unknown keys are problems; a dataclass-typed field is a section (a
mapping, or null for its defaults; null stays null when the annotation allows None); `bool` fields take only true
or false, `int` fields only integers (not booleans), `float` fields anything `float()` reads (YAML reads 5e7 as a
string); other annotations are taken as given. Problems are collected rather than raised, so a caller reports
every one of them at once.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from megatron_slim.errors import UserError

T = TypeVar("T")


def setting(default: Any = dataclasses.MISSING, *, help: str, **flag: Any) -> Any:
    """A job field that is also a command-line flag, declared once: its default here, its help and argparse
    options (`choices`; `many="comma"` or `many="append"` for a tuple) in the field's metadata, which
    commands/options.py `add_job_arguments` turns into the command's flag `--field-name`."""
    return dataclasses.field(default=default, metadata={"help": help, **flag})


def load_yaml(path: str | Path) -> Any:
    """A YAML file's content; a syntax error is one UserError naming the file, line and column (PyYAML's own
    message spans several lines and names an anonymous stream)."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise UserError(f"{at}: not valid YAML: {e.problem or e.context}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None


def load_dataclass(cls: type[T], data: Any, where: str, problems: list[str]) -> T:
    """`cls` from the mapping `data` (null: defaults); `where` names it in problems (e.g. `config.optimizer`).
    Bad values are left at their defaults and described in `problems`."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a mapping, got {type(data).__name__}")
        return cls()
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        problems.append(f"{where}: unknown keys {unknown} (known: {sorted(known)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        if key in known:
            ok, value = _field_value(hints[key], value, f"{where}.{key}", problems)
            if ok:
                values[key] = value
    return cls(**values)


def _field_value(hint: Any, value: Any, where: str, problems: list[str]) -> tuple[bool, Any]:
    """(accepted, value converted to the field's type)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kinds = [k for k in typing.get_args(hint) if k is not type(None)] if union else [hint]
    if value is None and union and len(kinds) < len(typing.get_args(hint)):
        return True, None
    if len(kinds) != 1:
        return True, value
    kind = kinds[0]
    if dataclasses.is_dataclass(kind):
        return True, load_dataclass(kind, value, where, problems)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        try:
            value, ok = float(value), True
        except (TypeError, ValueError):
            ok = False
    else:
        ok = True
    if not ok:
        problems.append(f"{where}: wrong type ({value!r})")
    return ok, value
