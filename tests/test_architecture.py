"""The package's structure, read from its source: no import cycles, and data flowing one way.

Every ``import`` statement counts, at module level or inside a function or an
``if TYPE_CHECKING:`` block: a cycle that only lazy imports keep from failing
is still two modules that each need the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flaresam"

# raw CT -> prepared store -> model step -> volume -> metrics -> report: a module may import its own layer or lower
LAYERS: tuple[tuple[str, ...], ...] = (
    ("flaresam", "flaresam.errors", "flaresam.jsondoc", "flaresam.messages", "flaresam.organs", "flaresam.paths", "flaresam.ui",
     "flaresam.cpu_memory", "flaresam.cpu_threads",
     "flaresam.workers"),
    ("flaresam.io",),
    ("flaresam.data",),
    ("flaresam.models",),
    ("flaresam.metrics", "flaresam.report", "flaresam.figures"),
    ("flaresam.training",),
    ("flaresam.predict", "flaresam.api"),
    ("flaresam.compare",),
    ("flaresam.cli", "flaresam.__main__"),
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The flaresam modules ``name`` imports: ``from a.b import c`` is ``a.b.c`` when that is a module, else ``a.b``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer(name: str) -> int:
    best = (-1, -1)  # (prefix length, layer): the longest matching prefix decides
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            # the root package is a layer of its own; every other entry covers its subpackages too
            inside = name == prefix or (prefix != "flaresam" and name.startswith(prefix + "."))
            if inside and len(prefix) > best[0]:
                best = (len(prefix), rank)
    assert best[1] >= 0, f"{name} belongs to no layer of LAYERS"
    return best[1]


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    assert len(graph) > 40
    # spot checks: a module-level import, a function-level one, and `from package import module`
    assert "flaresam.models.sam.archs" in graph["flaresam.models.sam.network"]
    assert "flaresam.models.sam.tinyvit_fold" in graph["flaresam.models.sam.fast_encoder"]
    assert "flaresam.models.registry" in graph["flaresam.predict.model"]


def test_the_package_has_no_import_cycles():
    found = cycles(import_graph())
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_a_cycle_is_found_when_there_is_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_every_module_has_a_layer():
    assert layer("flaresam.data.store") == 2 and layer("flaresam.models.sam.step") == 3
    with pytest.raises(AssertionError, match="no layer"):
        layer("flaresam.newmodule")


def test_modules_import_only_their_own_layer_or_lower():
    upward = sorted(f"{a} -> {b}" for a, targets in import_graph().items() for b in targets if layer(b) > layer(a))
    assert upward == [], "imports against the data flow: " + ", ".join(upward)


@pytest.mark.parametrize("package", ["flaresam.models.sam", "flaresam.models.dense", "flaresam.training", "flaresam.predict", "flaresam.compare"])
def test_package_inits_import_nothing(package):
    """Importing one module of these packages must not load the rest (the CLI stays light, no hidden cycles)."""
    assert import_graph()[package] == set()
