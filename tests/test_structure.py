"""The package's shape, read with ``ast``: small functions and classes, and no import cycle.

The limits are the project's style rules: no function over 60 lines, no class over 300, and no
cycle among the ``loramux`` modules' imports (module-level ones, and the imports inside functions,
which run later but still tie the modules together). Each check is shown to catch a case it must
refuse, so that a check that cannot fail does not pass for a rule kept.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# pyproject.toml's [tool.scikit-build.wheel.packages]: folder -> import name
PACKAGES = {"plugin/loramux": "loramux", "converters": "loramux.converters", "native": "loramux.native"}
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 300


def _modules() -> dict[str, ast.Module]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if name.startswith("loramux.native.llama.cpp"):
                continue
            out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


def _too_long(tree: ast.Module) -> list[str]:
    found = []
    for node in ast.walk(tree):
        limit = MAX_FUNCTION_LINES if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
        limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else limit
        if limit is not None and node.end_lineno - node.lineno + 1 > limit:
            found.append(f"{node.name} (line {node.lineno}): {node.end_lineno - node.lineno + 1} lines > {limit}")
    return found


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The loramux modules ``name`` imports (``from X import Y`` counts X.Y when Y is a module, else X)."""
    package = name if name in known and any(k.startswith(name + ".") for k in known) else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names} & known
            out |= subs if len(subs) == len(node.names) else subs | {base}  # `from pkg import mod`: mod, not pkg
    return {m for m in out if m in known and m != name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a list of modules, first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_function_over_60_lines_and_no_class_over_300():
    found = [f"{name}: {what}" for name, tree in _modules().items() for what in _too_long(tree)]
    assert not found, "split these:\n" + "\n".join(found)


def test_the_length_check_catches_a_long_function_and_a_long_class():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert _too_long(ast.parse(f"def f():\n{body}\n"))
    methods = "\n".join(f"    def m{i}(self):\n        return {i}\n" for i in range(MAX_CLASS_LINES // 3 + 1))
    assert _too_long(ast.parse(f"class C:\n{methods}"))
    assert not _too_long(ast.parse("def f():\n    return 1\n"))


def test_no_import_cycle_among_the_modules():
    modules = _modules()
    graph = {name: _imports(name, tree, set(modules)) for name, tree in modules.items()}
    assert sum(map(len, graph.values())) > 100  # the graph was read (an empty one has no cycle)
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_catches_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
