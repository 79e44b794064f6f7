"""Imports only run downward: no two subpackages (or top-level modules) of selfrefine_dist import each
other, directly or through others, counting imports inside functions too. Read from the source (ast)."""
import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "selfrefine_dist"


def unit(module: str) -> str:
    """selfrefine_dist.refine.driver -> refine; selfrefine_dist.pipeline -> pipeline."""
    return module.split(".")[1] if "." in module else module


def import_graph() -> dict:
    graph = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        if "kernels" in path.relative_to(PACKAGE).parts[:1]:
            continue
        source = unit(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("selfrefine_dist"):
                targets = [node.module] if node.module != "selfrefine_dist" else \
                          [f"selfrefine_dist.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("selfrefine_dist.")]
            for target in targets:
                if unit(target) != source and unit(target) != "selfrefine_dist":
                    graph[source].add(unit(target))
    return graph


def find_cycle(graph: dict):
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"refine", "train", "sampling", "pipeline"} <= set(graph)  # the graph was read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None
