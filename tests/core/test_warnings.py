"""torch's TorchScript deprecation notice reaches users: the package filters no warnings.

pyproject.toml ignores that notice (a DeprecationWarning in torch 2.13, a FutureWarning in 2.14) in
the tests that script a module to check something else. These tests are about the notice itself;
``pytest.warns`` records every warning whatever the configured filters.
"""
import subprocess
import sys

import pytest
import torch

from cases import child_env
from rnnloss import CTRNN, RNNLoss


def test_scripting_saving_and_loading_the_loss_show_torchs_deprecation_notice(tmp_path):
    loss = RNNLoss(CTRNN((2, 4, 2)), lambda_fr=0.1)
    path = str(tmp_path / "loss.pt")
    notice = (DeprecationWarning, FutureWarning)
    with pytest.warns(notice, match=r"`torch\.jit\.script` is deprecated"):
        scripted = torch.jit.script(loss)
    with pytest.warns(notice, match=r"`torch\.jit\.save` is deprecated"):
        torch.jit.save(scripted, path)
    with pytest.warns(notice, match=r"`torch\.jit\.load` is deprecated"):
        torch.jit.load(path)


def test_importing_the_package_installs_no_warning_filter():
    # In a fresh interpreter: torch first (whatever it sets up), then every module of the package.
    code = ("import warnings, torch; before = list(warnings.filters); "
            "import rnnloss, rnnloss.loss, rnnloss.model, rnnloss.terms, rnnloss.ratesums, rnnloss.rules, "
            "rnnloss.nn4n, rnnloss.trainer, rnnloss.export, rnnloss.export.cli, rnnloss.export.config, "
            "rnnloss.export.artifacts, rnnloss.export.parity, rnnloss.export.native, rnnloss.export.install; "
            "added = [f for f in warnings.filters if f not in before]; "
            "assert not added, added")
    result = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
