"""Fixtures shared by the whole suite (the only conftest.py of tests/core and tests/cli: a second one in a
folder without __init__.py would make ``from conftest import ...`` ambiguous). Case tables and helpers live in
``cases.py`` (import them from there).

The command line's fixtures: ``run_cli`` (the command in this process) and ``exported``, one real export shared
by the tests that read artifacts (exported once per session: about 15 s on two cores), with ``copy_of`` to
change a copy.

The names re-exported below keep ``from conftest import ...`` working in test files not yet moved to the
folder layout (tests/test_cpp.py, tests/test_onnx_export.py, tests/test_cuda_checks.py ...); new tests
import from ``cases``.
"""
import pytest

from cases import (ALL_ON, ALL_SUBSETS, COVERING, CUDA, NAMES, SMALL, lambdas_for, make_inputs,  # noqa: F401
                   make_model, script_roundtrip)


@pytest.fixture
def model():
    return make_model()


@pytest.fixture
def full_loss(model):
    from rnnloss import RNNLoss
    return RNNLoss(model, **ALL_ON)


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """``rnnloss-export ARGS`` (``rnnloss.export.main``) in this process from ``cwd``: (status, stdout, stderr)."""
    from rnnloss.export import main

    def run(args, cwd):
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        status = main([str(a) for a in args])
        captured = capsys.readouterr()
        return status, captured.out, captured.err
    return run


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """A real export of :data:`cases.SMALL` in a folder named ``artifacts`` (read only: copy it to change it)."""
    from rnnloss.export.cli import run
    from rnnloss.export.config import validate
    out = tmp_path_factory.mktemp("export") / "artifacts"
    assert run(validate(SMALL), out, force=False, device="cpu") == 0
    return out


@pytest.fixture
def copy_of(exported, tmp_path):
    """A fresh copy of the shared export, to change."""
    import shutil

    def copy(name="copy"):
        dest = tmp_path / name
        shutil.copytree(exported, dest)
        return dest
    return copy
