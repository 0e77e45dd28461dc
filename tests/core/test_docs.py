"""The documentation runs as written: the README's Python examples, the docstring examples of RNNLoss, CTRNN and
rnnloss.terms (as doctests), and the files generated from the rules table are up to date."""
import doctest
import re
import subprocess
import sys

import pytest
import torch

from cases import ROOT, child_env

README = ROOT / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_training_example_runs_and_lowers_the_loss(capsys):
    blocks = python_blocks()
    code = next(b for b in blocks if "opt.step()" in b)
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert all(name in printed for name in ("'mse'", "'fr_sd'", "'fr_cv'"))
    loss_fn, model, x, target = (namespace[k] for k in ("loss_fn", "model", "x", "target"))
    output, states = model(x)
    final = loss_fn(output, target, states)[1][0].item()
    torch.manual_seed(0)  # the example's seed: the same initial weights, untrained
    untrained = type(model)((3, 64, 2))
    assert final < loss_fn.lambdas[0].item() * ((untrained(x)[0] - target) ** 2).mean().item()
    # The mask example continues the training example's session.
    mask_block = next(b for b in blocks if "mask[35:]" in b)
    exec(compile(mask_block, str(README), "exec"), namespace)
    assert namespace["components"].shape == (7,) and torch.isfinite(namespace["total"])


def _doctests():
    import rnnloss.loss
    import rnnloss.model
    import rnnloss.terms
    finder = doctest.DocTestFinder()
    tests = []
    for module, names in ((rnnloss.loss, ["RNNLoss"]), (rnnloss.model, ["CTRNN"]), (rnnloss.terms, None)):
        for test in finder.find(module, module.__name__, globs=dict(vars(module))):
            short = test.name.split(".")[-1]
            if test.examples and (names is None or short in names):
                tests.append(pytest.param(test, id=test.name))
    return tests


DOCTESTS = _doctests()


def test_the_documented_objects_have_examples():
    names = {p.values[0].name for p in DOCTESTS}
    assert {"rnnloss.loss.RNNLoss", "rnnloss.model.CTRNN", "rnnloss.terms.error_sums", "rnnloss.terms.mean_square",
            "rnnloss.terms.rate_sd_cv"} <= names


@pytest.mark.parametrize("test", DOCTESTS)
def test_docstring_examples_run_as_written(test):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out = []
    result = runner.run(test, out=out.append, clear_globs=False)
    assert result.failed == 0, "".join(out)


@pytest.mark.parametrize("target, path", [("docs", "docs/errors.md"), ("cpp", "cpp/src/rules.h")])
def test_files_generated_from_the_rules_table_are_up_to_date(target, path):
    result = subprocess.run([sys.executable, "-m", "rnnloss.rules", target], capture_output=True, text=True,
                            timeout=120, env=child_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert (ROOT / path).read_text() == result.stdout, f"{path} is stale: run python -m rnnloss.rules {target} > {path}"


def test_the_documentation_site_builds_with_warnings_as_errors(tmp_path):
    # A broken API reference (a renamed function, a docstring griffe cannot parse) or a dead page fails here.
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (requirements/docs.txt)")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**child_env(), "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    for page in ("formulas", "api", "export", "cpp", "errors", "parity", "benchmarks", "design"):
        assert (tmp_path / "site" / page / "index.html").is_file(), page
