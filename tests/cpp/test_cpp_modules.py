"""rnnloss::CTRNN and rnnloss::RNNLoss as libtorch modules: clone() is a deep copy, and printing one shows
what Python's repr shows."""
import math

import pytest
import torch

from cpp_cases import ALL_ON, TOL, loss_inputs, make_loss, masked_model, run_cases
from rnnloss import CTRNN, RNNLoss
from rnnloss.export.native import native_payload

pytestmark = [pytest.mark.cpp, pytest.mark.xdist_group("cpp")]  # one worker builds and runs the C++


@pytest.mark.parametrize("variant", ["plain", "masked"])
def test_clone_is_a_deep_copy_that_computes_like_the_original(cpp_build, tmp_path, variant):
    model = masked_model("tanh") if variant == "masked" else make_loss(dtype=torch.float64).model
    loss = RNNLoss(model, **ALL_ON)
    loss.set_lambda("fr", 0.25)  # annealed: the copy keeps the buffer's value, not the constructor's
    pred, label, states = loss_inputs(loss)
    results = run_cases(cpp_build, tmp_path, [native_payload(loss)],
                        [{"kind": "clone", "artifact": 0, "pred": pred, "label": label, "states": states}])
    (status, separate, lambdas, values, names, flags, model_values, buffers, buffer_names, components, printed,
     model_printed) = results[0]
    assert status == "ok" and separate  # no parameter shared with the original
    # The original was changed after cloning (parameters and buffers + 1, λ doubled): the copies were not.
    assert torch.equal(lambdas, loss.lambdas)
    params = dict(model.named_parameters())
    assert list(names) == list(params)
    assert list(flags) == [p.requires_grad for p in params.values()]  # a "fixed" bias stays untrained
    for name, value, model_value in zip(names, values, model_values):
        assert torch.equal(value, params[name].detach()) and torch.equal(model_value, value), name
    assert dict(zip(buffer_names, buffers)).keys() == dict(model.named_buffers()).keys()
    for name, buffer in zip(buffer_names, buffers):
        assert torch.equal(buffer, dict(model.named_buffers())[name]), name
    with torch.no_grad():
        _, expected = loss(pred, label, states)
    torch.testing.assert_close(components, expected, **TOL[pred.dtype])
    # libtorch prints a module's line, then "(" and its submodules indented
    assert printed.splitlines()[0] == "rnnloss::RNNLoss(lambda_mse=1, lambda_in=0.3, lambda_hid=0.5, " \
                                      "lambda_out=0.7, lambda_fr=0.25, lambda_fr_sd=0.13, lambda_fr_cv=0.17)("
    assert printed.splitlines()[1] == f"  (model): rnnloss::{model!r}("
    assert model_printed.splitlines()[0] == f"rnnloss::{model!r}("


@pytest.mark.parametrize("options, python", [
    (dict(), lambda: CTRNN((3, 8, 2))),
    (dict(tau=50.0, dt=0.5, activation="retanh", batch_first=True), lambda: CTRNN((3, 8, 2), tau=50.0, dt=0.5,
                                                                                 activation="retanh",
                                                                                 batch_first=True)),
    (dict(preact_noise=0.1, postact_noise=1e-05, init_state="learn", learn_alpha=True),
     lambda: CTRNN((3, 8, 2), preact_noise=0.1, postact_noise=1e-05, init_state="learn", learn_alpha=True)),
    (dict(sparsity_masks=[None, torch.ones(8, 8), None], plasticity_masks=[torch.ones(8, 3), None, None]),
     lambda: CTRNN((3, 8, 2), sparsity_masks=(None, torch.ones(8, 8), None),
                   plasticity_masks=(torch.ones(8, 3), None, None))),
], ids=["plain", "options", "noise_and_learned", "masks"])
def test_printing_a_ctrnn_shows_pythons_repr(cpp_build, tmp_path, options, python):
    results = run_cases(cpp_build, tmp_path, [], [{"kind": "ctrnn", "options": {"n_in": 3, "n_hid": 8, "n_out": 2,
                                                                                  **options}}])
    status, printed = results[0]
    lines = printed.splitlines()
    assert status == "ok" and lines[0] == f"rnnloss::{python()!r}(", printed
    assert "(recurrent_layer): rnnloss::RecurrentLayer" in printed and "(readout_layer): torch::nn::Linear" in printed


def test_printing_a_loss_shows_its_nonzero_lambdas_as_python_does(cpp_build, tmp_path):
    loss = make_loss(lambdas=dict(lambda_mse=1.0, lambda_fr=0.01, lambda_fr_cv=1 / 3))
    lambdas = [1.0, 0.0, 0.0, 0.0, 0.01, 0.0, 1 / 3]
    results = run_cases(cpp_build, tmp_path, [native_payload(loss)],
                        [{"kind": "loss_options", "artifact": 0, "lambdas": lambdas}])
    assert math.isclose(results[0][1][6].item(), 1 / 3, rel_tol=0, abs_tol=0)
    assert results[0][2].splitlines()[0] == f"rnnloss::RNNLoss({loss.extra_repr()})("
