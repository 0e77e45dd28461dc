"""The package's modules import one another in one direction: none imports a module that imports it back."""
import ast
from pathlib import Path
from typing import Dict, List, Set

import rnnloss

PACKAGE = Path(rnnloss.__file__).parent


def modules() -> List[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def package_imports(module: str) -> Set[str]:
    """Names of the rnnloss modules that ``module`` imports anywhere in its file (function bodies too)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif node.module and node.module.startswith("rnnloss."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("rnnloss.")}
    return found


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle of ``graph`` (module -> modules it imports) as [a, b, ..., a], or [] if none."""
    state: Dict[str, int] = {}  # 1 on the current path, 2 finished
    path: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_the_checker_sees_nested_imports_and_finds_cycles():
    # The model reaches nn4n only inside CTRNN.from_nn4n; the loss imports the model at the top.
    assert "nn4n" in package_imports("model") and "model" in package_imports("loss")
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_package_imports_in_one_direction():
    names = set(modules())
    graph = {m: package_imports(m) & names for m in names}
    assert find_cycle(graph) == [], "import cycle"
