"""The package's floors only point down: every import in megatron_slim/ (module level or inside a function) goes to
the same package or to a lower floor, no two modules import each other through any path, and no module imports
another module's private names. The floors are the ones CONTRIBUTING.md describes.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "megatron_slim"

# Lowest first. A top-level name is a package (megatron_slim/<name>/) or a module (megatron_slim/<name>.py).
FLOORS: list[set[str]] = [
    {"", "errors", "runtime"},                            # vocabulary of failures, processes and launchers
    {"models"},                                           # model config, families, mapping/surgery vocabulary
    {"checkpoint", "data"},                               # formats and data sources at the edges
    {"compress", "distill"},                              # algorithms on plain tensors
    {"engines", "train", "eval", "verify"},              # typed jobs that run models
    {"run", "demo", "ablate"},                            # recipes, the embedded default, the ablation suite
    {"commands", "cli"},                                  # argument parsing only
]


def _floor(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(FLOORS):
        if top in names:
            return i
    raise AssertionError(f"{module}: top-level name {top!r} is on no floor; add it to FLOORS and CONTRIBUTING.md")


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every megatron_slim import anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "megatron_slim"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "megatron_slim":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, None, node.lineno) if sub in MODULES else (target, alias.name, node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    return {name: {m for m, _, _ in _imports(name, path) if m in MODULES} for name, path in MODULES.items()}


def test_floors_only_point_down() -> None:
    wrong: list[str] = []
    for name, path in MODULES.items():
        for target, _, line in _imports(name, path):
            same_package = target.split(".")[:2] == name.split(".")[:2]
            if not same_package and _floor(target) > _floor(name):
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line}: {name} (floor {_floor(name)}) imports "
                             f"{target} (floor {_floor(target)})")
    assert not wrong, "imports from a lower floor to a higher one:\n" + "\n".join(dict.fromkeys(wrong))


def test_no_import_cycles() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"modules that import each other: {cycles}"


def test_no_private_imports() -> None:
    private = [f"{path.relative_to(ROOT.parent)}:{line}: {name} imports {target}.{attr}"
               for name, path in MODULES.items() for target, attr, line in _imports(name, path)
               if attr is not None and attr.startswith("_") and not attr.startswith("__")]
    assert not private, "private names imported from another module:\n" + "\n".join(private)


@pytest.mark.parametrize("module, target, expected", [
    ("megatron_slim.models.config", "megatron_slim.errors", True),
    ("megatron_slim.models.config", "megatron_slim.checkpoint.mcore", False),
    ("megatron_slim.commands.run", "megatron_slim.run.recipe_check", True),
])
def test_floor_rule_itself(module: str, target: str, expected: bool) -> None:
    """The checker would see a violation (a guard against a FLOORS table that admits everything)."""
    assert (_floor(target) <= _floor(module)) is expected
