"""The package's import graph: no module imports, directly or through others, a module that
imports it back, and the graph stays shallow. Every `import` statement counts, the late ones
inside functions too: a late import hides a circle, it does not remove it."""
import ast
from functools import lru_cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cmal"
# From the tools that drive a run (tools.demo -> tools.demo_compare -> train) down to the
# errors every layer raises; train.py alone reaches 7.
MAX_LEVELS = 9


def _module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph():
    """{module: the package's modules it imports}, from every import statement of its source."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                # `from cmal.tresnet import hub` imports the module cmal.tresnet.hub
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                               for a in node.names)
        graph[name] = set()
        for target in targets:
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target != name:
                graph[name].add(target)
    return graph


def circles(graph):
    """The strongly connected groups of more than one module (Tarjan)."""
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
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def deepest_chain(graph):
    @lru_cache(None)
    def chain(v):
        below = [chain(w) for w in graph[v]]
        return (v,) + max(below, key=len, default=())
    return max((chain(v) for v in graph), key=len)


def test_no_module_imports_itself_back():
    assert circles(import_graph()) == []


def test_the_import_graph_stays_shallow():
    graph = import_graph()
    if circles(graph):
        pytest.skip("a circle has no depth: see test_no_module_imports_itself_back")
    chain = deepest_chain(graph)
    assert len(chain) <= MAX_LEVELS, " -> ".join(chain)
    assert len(deepest_chain({k: v for k, v in graph.items() if not k.startswith("cmal.tools")}
                             )) <= 7


def test_the_checks_see_a_circle():
    graph = import_graph()
    graph["cmal.errors"] = graph["cmal.errors"] | {"cmal.train"}
    assert any("cmal.errors" in group and "cmal.train" in group for group in circles(graph))


def test_leaf_modules_import_nothing_of_the_package_above_them():
    graph = import_graph()
    assert graph["cmal.errors"] == set()
    assert graph["cmal.distributed"] <= {"cmal.errors"}
    assert not graph["cmal.data"] & {"cmal.settings", "cmal.checkpoint", "cmal.train"}
    assert not graph["cmal.settings"] & {"cmal.checkpoint", "cmal.train", "cmal.engine"}
