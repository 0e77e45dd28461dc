"""Property-based parity: eager == scripted == float64 reference over random shapes, covering sets of active
components, λ magnitudes and kinds of rates; any input gives a value or the same error eager and scripted; the
scripted module and an ONNX Runtime session of the loss are thread safe."""
import math
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cases import COVERING, NAMES, make_model
from reference import loss_components
from rnnloss import RNNLoss

RATE_KINDS = ("random", "zero", "equal", "negative", "large")


def rates(kind, shape, g):
    if kind == "random":
        return torch.rand(shape, generator=g, dtype=torch.float64)
    if kind == "zero":
        return torch.zeros(shape, dtype=torch.float64)
    if kind == "equal":
        return torch.full(shape, 0.37, dtype=torch.float64)
    if kind == "negative":  # tanh rates
        return torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1.2
    return 1e4 * torch.rand(shape, generator=g, dtype=torch.float64)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(time=st.integers(1, 8), batch=st.integers(1, 8), n_hid=st.integers(1, 16), n_in=st.integers(1, 4),
       n_out=st.integers(1, 4), active=st.sampled_from(COVERING), kind=st.sampled_from(RATE_KINDS),
       log_lambda=st.floats(-8, 4), seed=st.integers(0, 2**16))
def test_eager_scripted_and_reference_agree(time, batch, n_hid, n_in, n_out, active, kind, log_lambda, seed):
    lam = 10.0 ** log_lambda
    torch.manual_seed(seed)
    model = make_model((n_in, n_hid, n_out), seed=seed)
    loss = RNNLoss(model, **{f"lambda_{n}": (lam if i in active else 0.0) for i, n in enumerate(NAMES)})
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(time, batch, n_out, generator=g, dtype=torch.float64)
    label = torch.randn(time, batch, n_out, generator=g, dtype=torch.float64)
    states64 = rates(kind, (time, batch, n_hid), g)
    inputs = [t.float() for t in (pred, label, states64)]
    ref = loss_components(*inputs, model.recurrent_layer.input_layer.weight,
                          model.recurrent_layer.hidden_layer.weight, model.readout_layer.weight, loss.lambdas)
    eager = loss(*inputs)[1].detach().double()
    scripted = torch.jit.script(loss)(*inputs)[1].detach().double()
    assert torch.equal(eager, scripted) or torch.allclose(eager, scripted, rtol=1e-6, atol=0)
    # Tolerances from float32 accumulation (inputs are exact in float32, so only summation errs):
    # - sums of squares (0–4): ≤ 1024 terms, the §2 guarantee rtol 1e-5;
    # - σ is built from deviations r̄_i − μ whose absolute error is a few ulp of max|r|:
    #   abs tol 8·ε·max|r| (times λ);
    # - CV = σ/μ: first-order error δσ/|μ| + σ·δμ/μ² with δσ, δμ ≤ 8·ε·max|r|.
    eps = torch.finfo(torch.float32).eps
    r = inputs[2].double().reshape(-1, n_hid)
    mu = r.mean().item()
    sigma = (r.mean(0) - mu).pow(2).mean().sqrt().item()
    delta = 8 * eps * r.abs().max().item()
    for i in range(7):
        expected = ref[i]
        if math.isinf(expected):  # CV with μ = 0 and σ > 0
            assert math.isinf(eager[i].item())
            continue
        if i == 5:
            atol = lam * delta
        elif i == 6 and mu != 0.0:
            atol = lam * (delta / abs(mu) + sigma * delta / mu ** 2)
        else:
            atol = 0.0
        assert eager[i].item() == pytest.approx(expected, rel=1e-5, abs=atol), (i, kind)


@pytest.mark.slow
def test_scripted_module_and_onnx_session_are_thread_safe(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="the ONNX extra (pip install '.[onnx]') is not installed")
    from rnnloss.export import artifacts
    from rnnloss.export.config import validate
    loss = RNNLoss(make_model((3, 16, 2)), lambda_fr=0.1, lambda_fr_sd=0.1, lambda_fr_cv=0.1).eval()
    scripted = torch.jit.script(loss)
    inputs = artifacts.sample_inputs(loss, 7, 4, seed=0)
    onnx_writer = next(a for a in artifacts.REGISTRY if a.name == "rnn_loss.onnx")
    build = artifacts.Build(loss, validate({}), artifacts.sample_inputs(loss, 5, 3, seed=1), {})
    onnx_writer.write(build, tmp_path / "l.onnx")
    session = ort.InferenceSession(str(tmp_path / "l.onnx"), providers=["CPUExecutionProvider"])
    feeds = {k: v.numpy() for k, v in zip(("pred", "label", "states"), inputs)}
    with torch.no_grad():
        expected_ts = scripted(*inputs)[1]
    expected_ort = session.run(None, feeds)[1]
    failures = []

    def worker():
        for _ in range(25):
            with torch.no_grad():
                got = scripted(*inputs)[1]
            if not torch.equal(got, expected_ts):
                failures.append("torchscript")
            if not np.array_equal(session.run(None, feeds)[1], expected_ort):
                failures.append("onnxruntime")

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


_SCRIPTED_FOR_ERRORS = {}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pred_shape=st.lists(st.integers(0, 3), min_size=1, max_size=4),
       label_shape=st.lists(st.integers(0, 3), min_size=1, max_size=4),
       states_last=st.integers(1, 6), states_lead=st.integers(0, 4), seed=st.integers(0, 100))
def test_any_input_gives_a_value_or_the_documented_error_identically_eager_and_scripted(
        pred_shape, label_shape, states_last, states_lead, seed):
    # N_hid = 4: states with another last dimension, shape mismatches and empty tensors must
    # raise the same message eager and scripted; valid inputs must give the same numbers.
    if "loss" not in _SCRIPTED_FOR_ERRORS:
        eager = RNNLoss(make_model((2, 4, 3)), lambda_fr=0.5, lambda_fr_sd=0.5)
        _SCRIPTED_FOR_ERRORS.update(loss=eager, scripted=torch.jit.script(eager))
    eager, scripted = _SCRIPTED_FOR_ERRORS["loss"], _SCRIPTED_FOR_ERRORS["scripted"]
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(pred_shape, generator=g)
    label = torch.randn(label_shape, generator=g)
    states = torch.rand([states_lead, states_last] if states_lead else [states_last], generator=g)
    try:
        expected = eager(pred, label, states)
    except (ValueError, TypeError) as e:
        with pytest.raises(torch.jit.Error) as err:
            scripted(pred, label, states)
        assert str(e) in str(err.value)
        valid = pred_shape == label_shape and 0 not in pred_shape and states_last == 4  # 1-D states: one sample
        assert not valid, f"valid input refused: {e}"
        return
    assert pred_shape == label_shape and states_last == 4
    got = scripted(pred, label, states)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-6, atol=0)
