"""The package's modules import one another in one direction: none imports a module that imports it back."""
import ast
from pathlib import Path

import rnnloss

PACKAGE = Path(rnnloss.__file__).parent


def package_imports(module: str) -> set:
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


def test_package_imports_sees_relative_absolute_and_nested_imports():
    # The checker itself: the loss imports the model at the top; the model reaches nn4n only from
    # inside CTRNN.from_nn4n.
    assert "model" in package_imports("loss")
    assert "nn4n" in package_imports("model")


def test_nn4n_interop_sits_below_the_model():
    # CTRNN.from_nn4n uses rnnloss.nn4n; nn4n must not import the model (or anything above it) back.
    assert package_imports("nn4n") & {"model", "loss", "export", "parity", "trainer", "config"} == set()
