"""The package's layering: no import cycles (function-level imports included), leaf modules stay
leaves, no import hidden in strings, and no public name hides a submodule."""
from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import leanformer

PACKAGE = Path(leanformer.__file__).parent

# leaf module → the leanformer modules it may import
LEAVES = {
    "leanformer.errors": set(),
    "leanformer.constants": set(),
    "leanformer.stack": set(),
    "leanformer.paths": {"leanformer.errors"},
    "leanformer.files": {"leanformer.errors"},
    "leanformer.targets": {"leanformer.constants", "leanformer.errors"},
}


def module_files() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """leanformer modules `name` imports anywhere in its file (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    graph = {name: imported_modules(name, path, known) for name, path in files.items()}
    # a package's __init__ re-exports its children; importing a child imports its parents first,
    # which is not a dependency of the child on its siblings
    return {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 30
    assert cycles(graph) == []


def test_leaf_modules_stay_leaves():
    graph = import_graph()
    for leaf, allowed in LEAVES.items():
        assert graph[leaf] <= allowed, f"{leaf} imports {sorted(graph[leaf] - allowed)}"


def test_no_imports_hidden_in_strings():
    pattern = re.compile(r"""["']leanformer(\.\w+)+:\w+["']""")
    offenders = [str(p) for p in PACKAGE.rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_no_public_name_hides_a_submodule():
    for info in pkgutil.walk_packages(leanformer.__path__, "leanformer."):
        if info.name.endswith(".__main__"):  # a script: importing it runs the command line
            continue
        module = importlib.import_module(info.name)
        parent_name, _, child = info.name.rpartition(".")
        parent = importlib.import_module(parent_name)
        assert getattr(parent, child) is module, f"{parent_name}.{child} is not the submodule"
