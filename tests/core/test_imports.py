"""How the package's modules import one another, and what importing costs.

- One direction: the model below the loss, the loss below the export wing; the core (everything outside
  ``rnnloss.export``) never imports the export wing; no cycle anywhere (imports inside functions count).
- ``import rnnloss`` does not import torch until an attribute is used, nor do the export wing's package and
  the modules the CLI reads before parsing (``--help`` answers at once: tests/cli).
- Every ``torch.load`` of the package is ``weights_only=True`` but the one explicit opt-in.
"""
import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest

from cases import child_env

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "rnnloss"


def modules() -> List[str]:
    """Every module of the package, dotted below ``rnnloss`` (``loss``, ``export.cli`` ...), packages as their name."""
    out = []
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts) or "__init__")
    return sorted(out)


def _file(module: str) -> Path:
    if module == "__init__":
        return PACKAGE / "__init__.py"
    path = PACKAGE.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def package_imports(module: str) -> Set[str]:
    """The package modules ``module`` imports anywhere in its file (function bodies too), dotted as in :func:`modules`;
    ``from .x import y`` counts as importing ``x`` and, where ``x.y`` is a module, ``x.y``."""
    known = set(modules())
    path = _file(module)
    if path.name == "__init__.py":
        package = module.split(".") if module != "__init__" else []
    else:
        package = module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else list(package)
                base += node.module.split(".") if node.module else []
            elif node.module and node.module.startswith("rnnloss"):
                base = node.module.split(".")[1:]
            else:
                continue
            if base:
                found.add(".".join(base))
            found |= {".".join(base + [a.name]) for a in node.names if ".".join(base + [a.name]) in known}
        elif isinstance(node, ast.Import):
            found |= {".".join(a.name.split(".")[1:]) for a in node.names if a.name.startswith("rnnloss.")}
    ancestors = {".".join(module.split(".")[:k]) for k in range(1, module.count(".") + 1)}
    return {m for m in found if m in known and m != module and m not in ancestors}  # a parent package is no cycle


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


def test_the_checker_sees_nested_and_relative_imports_and_finds_cycles():
    # The model reaches nn4n only inside CTRNN.from_nn4n; the CLI imports the registry inside functions.
    assert "nn4n" in package_imports("model") and "model" in package_imports("loss")
    assert {"export.artifacts", "export.install", "export.config"} <= package_imports("export.cli")
    assert {"loss", "model", "rules"} <= package_imports("export.native")
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_package_has_no_import_cycle():
    graph = {m: package_imports(m) for m in modules()}
    assert find_cycle(graph) == [], "import cycle"


# What each layer may not import: the model sits below the loss, the loss below the trainer and the export wing.
FORBIDDEN = {"rules": {"model", "loss", "terms", "ratesums", "trainer", "nn4n"}, "ratesums": {"model", "loss", "terms"},
             "terms": {"model", "loss", "trainer"}, "nn4n": {"model", "loss", "trainer"},
             "model": {"loss", "terms", "trainer"}, "loss": {"trainer"}}


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_imports_go_from_the_model_to_the_loss_to_the_export_wing(module):
    imported = package_imports(module)
    assert not imported & FORBIDDEN[module]
    assert not {m for m in imported if m == "export" or m.startswith("export.")}


def test_no_core_module_imports_the_export_wing():
    core = [m for m in modules() if m != "export" and not m.startswith("export.")]
    offenders = {m: sorted(i for i in package_imports(m) if i == "export" or i.startswith("export."))
                 for m in core}
    assert {m: i for m, i in offenders.items() if i} == {}


def _fresh(code):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=child_env())
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()


def test_import_rnnloss_does_not_import_torch_until_an_attribute_is_used():
    out = _fresh("import sys, rnnloss; print('torch' in sys.modules); rnnloss.RNNLoss; print('torch' in sys.modules)")
    assert out == ["False", "True"]


@pytest.mark.parametrize("module", ["rnnloss.export", "rnnloss.export.cli", "rnnloss.export.folder",
                                    "rnnloss.export.install"])
def test_the_export_wings_entry_and_folder_modules_import_without_torch(module):
    assert _fresh(f"import sys, {module}; print('torch' in sys.modules)") == ["False"]


def test_the_core_in_use_never_imports_the_export_wing():
    code = ("import sys, torch, rnnloss, rnnloss.terms, rnnloss.ratesums, rnnloss.trainer, rnnloss.nn4n; "
            "from rnnloss import CTRNN, RNNLoss; loss = RNNLoss(CTRNN((2, 4, 1)), lambda_fr=0.1); "
            "torch.jit.script(loss); print(sorted(m for m in sys.modules if m.startswith('rnnloss.export')))")
    assert _fresh(code) == ["[]"]


def calls_of(text: str, name: str) -> List[str]:
    """Every ``name(...)`` call in ``text``, its parentheses balanced."""
    out = []
    for match in re.finditer(re.escape(name) + r"\(", text):
        depth, end = 0, match.end() - 1
        for end in range(match.end() - 1, len(text)):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                break
        out.append(text[match.start():end + 1])
    return out


def test_every_torch_load_is_weights_only_except_the_explicit_trust_opt_in():
    # The single full-unpickling load is CTRNN.from_nn4n(..., trust_checkpoint=True), guarded and warned about.
    unsafe, seen = [], 0
    for path in PACKAGE.rglob("*.py"):
        for call in calls_of(path.read_text(), "torch.load"):
            seen += 1
            if "weights_only=True" not in call:
                unsafe.append((path.name, call))
    assert seen >= 3  # nn4n, the native file and its embedded description
    assert unsafe == [("nn4n.py", 'torch.load(path, map_location="cpu", weights_only=False)')]
    text = (PACKAGE / "nn4n.py").read_text()
    guard = text.index("if not trust_checkpoint:")
    assert guard < text.index("weights_only=False") and "warnings.warn" in text[guard:]
