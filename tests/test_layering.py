"""Layering of the package: no import cycles, and the library never imports the orchestrator.

Imports are read from the source with `ast`, including the lazy ones inside functions: a lazy
import hides a cycle from the interpreter at import time but not from a reader, who still has to
hold both modules in mind to understand either.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mlas_lora

PACKAGE = Path(mlas_lora.__file__).parent
LIBRARY = ("adapters", "awareness", "transfer", "training", "translation", "evaluation", "models", "data")
"""Stages that `mlas_lora.experiments` composes; none of them may import it back."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _known(name: str) -> str | None:
    """The most specific mlas_lora module that `name` (a module or a name inside one) refers to."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _from_base(node: ast.ImportFrom, module: str) -> str:
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imported_modules(module: str, source: str) -> set[str]:
    """mlas_lora modules that `module` imports anywhere in `source` (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {_known(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, module)
            # `from pkg import sub` imports the module pkg.sub; `from mod import name`, the module mod.
            found |= {_known(f"{base}.{alias.name}") for alias in node.names}
    return found - {None, module}


GRAPH = {
    module: imported_modules(module, path.read_text(encoding="utf-8")) for module, path in MODULES.items()
}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path of modules) through each strongly connected component larger than one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = {stack.pop()}
            while node not in component:
                component.add(stack.pop())
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    start = min(component)
    path, seen = [start], {start}
    while True:
        nxt = min(n for n in graph[path[-1]] if n in component)
        if nxt in seen:
            return path[path.index(nxt) :] + [nxt]
        path.append(nxt)
        seen.add(nxt)


def test_every_kind_of_import_is_seen():
    source = """
import torch
import mlas_lora.models.arch
from mlas_lora.data import records
from mlas_lora.errors import MlasLoraError
from . import routed_lora
from ..evaluation.metrics import score_corpus

def lazy():
    from mlas_lora.models.gguf import prepare_model
"""
    assert imported_modules("mlas_lora.adapters.export", source) == {
        "mlas_lora.models.arch",
        "mlas_lora.data.records",
        "mlas_lora.errors",
        "mlas_lora.adapters.routed_lora",
        "mlas_lora.evaluation.metrics",
        "mlas_lora.models.gguf",
    }


def test_cycles_are_found_and_spelled_out():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles():
    cycles = find_cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_library_does_not_import_the_experiments():
    offenders = {
        module: sorted(m for m in imported if m.startswith("mlas_lora.experiments"))
        for module, imported in GRAPH.items()
        if module.split(".")[1:2] and module.split(".")[1] in LIBRARY
    }
    offenders = {module: imported for module, imported in offenders.items() if imported}
    assert not offenders, f"library modules importing mlas_lora.experiments: {offenders}"
