"""Parsed YAML -> nested dataclasses, one set of rules for recipes and run configs.

Rules, read from each field's annotation: unknown keys are problems; a dataclass-typed field is a section (a
mapping, or null for its defaults; null stays null when the annotation allows None); `bool` fields take only true
or false, `int` fields only integers (not booleans), `float` fields anything `float()` reads (YAML reads 5e7 as a
string); other annotations are taken as given. Problems are collected rather than raised, so a caller reports
every one of them at once.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from megatron_slim.errors import UserError

T = TypeVar("T")

# Nodes a document may expand to once its aliases are followed: configs have hundreds; a 1 KB "billion laughs"
# (anchors of lists of aliases of anchors ...) expands to billions, which any later walk over the data (the dry
# run's dump, a deep copy) materialises: gigabytes from a file that loads in a millisecond as shared objects.
MAX_EXPANDED_NODES = 100_000


def _expanded_size(node: yaml.Node, where: str) -> int:
    """The node count of `node` with every alias expanded, computed once per distinct node (aliases are shared
    node objects), refused past MAX_EXPANDED_NODES."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(node, False)]
    while stack:
        n, ready = stack.pop()
        if id(n) in sizes:
            continue
        children = ([c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode)
                    else n.value if isinstance(n, yaml.SequenceNode) else [])
        if not ready:
            stack.append((n, True))
            stack += [(c, False) for c in children if id(c) not in sizes]
            continue
        sizes[id(n)] = 1 + sum(sizes.get(id(c), 1) for c in children)
        if sizes[id(n)] > MAX_EXPANDED_NODES:
            raise UserError(f"{where}: YAML aliases expand to more than {MAX_EXPANDED_NODES} values (an alias "
                            "bomb?); write the values out instead of nesting aliases")
    return sizes[id(node)]


def _safe_load_bounded(text: str, where: str) -> Any:
    """yaml.safe_load, refusing documents whose aliases expand past MAX_EXPANDED_NODES before constructing them."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, where)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def setting(default: Any = dataclasses.MISSING, *, help: str, **flag: Any) -> Any:
    """A job field that is also a command-line flag, declared once: its default here, its help and flag options in
    the field's metadata, which commands/options.py `add_job_arguments` turns into the command's flag
    `--field-name`. Options: `flag="name"` (the flag's name when it is not the field's, e.g. `--model` for a
    tuple `models`), `positional=True`, `hidden=True` (left out of --help: internal plumbing), `many="comma"` or
    `many="append"` for a tuple, `tp_help` for a layout's --tp, and argparse's own (`choices`, `metavar`)."""
    return dataclasses.field(default=default, metadata={"help": help, **flag})


def load_yaml(path: str | Path) -> Any:
    """A YAML file's content; a syntax error is one UserError naming the file, line and column (PyYAML's own
    message spans several lines and names an anonymous stream); aliases may expand to MAX_EXPANDED_NODES."""
    try:
        return _safe_load_bounded(Path(path).read_text(), str(path))
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
        if ok and not math.isfinite(value):  # YAML's .nan/.inf: a NaN learning rate trains nothing, silently
            problems.append(f"{where}: must be a finite number, got {value!r}")
            return False, value
    else:
        ok = True
    if not ok:
        problems.append(f"{where}: wrong type ({value!r})")
    return ok, value
