"""The C++ programs (libtorch through the installed torch): build, eval parity, training."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rnnloss import CTRNN, RNNLoss, export
from rnnloss.config import validate
from rnnloss.trainer import CTRNNTrainer

pytestmark = pytest.mark.cpp
ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build"
CONFIG = validate({"model": {"dims": [3, 32, 2]}, "example": {"time": 6, "batch": 3}})


@pytest.fixture(scope="module")
def programs():
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("cmake and a C++ compiler are needed to build cpp/")
    prefix = torch.utils.cmake_prefix_path
    subprocess.run(["cmake", "-S", str(ROOT / "cpp"), "-B", str(BUILD), f"-DCMAKE_PREFIX_PATH={prefix}"],
                   check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(BUILD), "-j", str(os.cpu_count() or 2)], check=True,
                   capture_output=True, text=True)
    return BUILD / "train_ctrnn", BUILD / "eval_loss"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cpp") / "artifacts"
    folder.mkdir()
    loss = export.build(CONFIG)
    export.export_torchscript(loss, folder / export.LOSS_PT)
    export.export_torchscript(CTRNNTrainer(loss), folder / export.TRAIN_PT)
    return folder, loss


def test_eval_loss_matches_python_eager_values_and_gradients(programs, artifacts, tmp_path):
    _, eval_loss = programs
    folder, loss = artifacts
    pred, label, states = export.sample_inputs(loss, 9, 4, seed=5)
    torch.save({"pred": pred, "label": label, "states": states}, tmp_path / "in.pt")
    subprocess.run([str(eval_loss), str(folder), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")], check=True,
                   capture_output=True)
    got = dict(zip(("total", "components", "d_pred", "d_states"), torch.load(tmp_path / "out.pt", weights_only=True)))
    pred.requires_grad_(True)
    states.requires_grad_(True)
    total, comps = loss(pred, label, states)
    d_pred, d_states = torch.autograd.grad(total + comps.sum(), (pred, states))
    # Same kernels in libtorch and Python: rtol 1e-5 (one device).
    for key, ref in {"total": total, "components": comps, "d_pred": d_pred, "d_states": d_states}.items():
        torch.testing.assert_close(got[key], ref.detach(), rtol=1e-5, atol=1e-8, msg=key)


def test_eval_loss_reports_bad_inputs_as_an_error(programs, artifacts, tmp_path):
    _, eval_loss = programs
    folder, loss = artifacts
    pred, label, states = export.sample_inputs(loss, 3, 2, seed=1)
    torch.save({"pred": pred, "label": label[:, :1], "states": states}, tmp_path / "in.pt")
    result = subprocess.run([str(eval_loss), str(folder), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "pred and label must have the same shape" in result.stderr


def test_train_ctrnn_halves_the_mse_anneals_and_keeps_the_masks(programs, tmp_path):
    train_ctrnn, _ = programs
    torch.manual_seed(0)
    n_hid = 32
    hid_mask = (torch.rand(n_hid, n_hid) < 0.5).float()
    signs = torch.ones(n_hid)
    signs[24:] = -1.0  # 24 excitatory, 8 inhibitory neurons
    model = CTRNN((3, n_hid, 2), sparsity_masks=(None, hid_mask, None), ei_masks=(None, signs, signs))
    loss = RNNLoss(model, lambda_hid=1e-3, lambda_fr=1e-2, lambda_fr_sd=1e-2)
    folder = tmp_path / "art"
    folder.mkdir()
    export.export_torchscript(CTRNNTrainer(loss), folder / export.TRAIN_PT)
    out = tmp_path / "trained.pt"
    result = subprocess.run([str(train_ctrnn), str(folder), "--steps", "200", "--out", str(out), "--log-every", "50"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"initial_mse=(\S+) final_mse=(\S+) steps=200", summary)
    assert m and float(m.group(2)) <= 0.5 * float(m.group(1))
    assert "fr_sd=" in result.stdout and "step 50 " in result.stdout
    trained = torch.jit.load(str(out))
    w_hid = trained.loss.model.recurrent_layer.hidden_layer.weight
    w_out = trained.loss.model.readout_layer.weight
    assert torch.all(w_hid[hid_mask == 0] == 0)
    assert torch.all(w_hid[:, :24] >= 0) and torch.all(w_hid[:, 24:] <= 0)
    assert torch.all(w_out[:, :24] >= 0) and torch.all(w_out[:, 24:] <= 0)
    assert not torch.equal(w_hid, model.recurrent_layer.hidden_layer.weight)  # it did train
    # λ_fr was annealed through the buffer to a tenth of its initial value, and took effect.
    assert trained.loss.lambdas[4].item() == pytest.approx(1e-3, rel=1e-5)
    last_log = [line for line in result.stdout.splitlines() if line.startswith("step 200 ")]
    assert len(last_log) == 1 and last_log[0].endswith("lambda_fr=0.001")
    assert re.search(r"^ms_per_step=\d", result.stdout, flags=re.M)


def test_train_ctrnn_rejects_bad_arguments(programs, tmp_path):
    train_ctrnn, _ = programs
    assert subprocess.run([str(train_ctrnn)], capture_output=True).returncode == 2
    assert subprocess.run([str(train_ctrnn), str(tmp_path), "--device", "tpu"], capture_output=True).returncode == 2
    missing = subprocess.run([str(train_ctrnn), str(tmp_path)], capture_output=True, text=True)
    assert missing.returncode == 1 and "ctrnn_train.pt" in missing.stderr
