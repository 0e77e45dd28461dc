"""The native C++ library (rnnloss::CTRNN, rnnloss::RNNLoss, rnnloss::load) against Python eager: values
and gradients of the loss and the model, the Adam training trajectory. Tolerances: cpp_cases' docstring."""
import pytest
import torch

from cpp_cases import (ACTIVATIONS, ALL_ON, COVERING, TOL, assert_loss_result, lambdas_for, loss_inputs, make_loss,
                       masked_model, python_loss_result, run_cases)
from rnnloss import CTRNN, RNNLoss
from rnnloss.export.native import NATIVE, native_payload, save_native

pytestmark = [pytest.mark.cpp, pytest.mark.xdist_group("cpp")]  # one worker builds and runs the C++
LAYOUTS = {"time_first": False, "batch_first": True}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
SUBSETS = COVERING  # every component alone, every pair, all seven, a seeded sample of 10 others


@pytest.fixture(scope="module")
def active_set_results(cpp_build, tmp_path_factory):
    """C++ and Python results for every (dtype, layout, active set), the C++ ones from one call."""
    artifacts, cases, refs = [], [], []
    for dname, dtype in DTYPES.items():
        for lname, batch_first in LAYOUTS.items():
            for active in SUBSETS:
                loss = make_loss(dtype=dtype, batch_first=batch_first, lambdas=lambdas_for(active))
                pred, label, states = loss_inputs(loss)
                if not any(i >= 4 for i in active):
                    states = None  # states are optional when no rate term is active
                artifacts.append(native_payload(loss))
                cases.append({"kind": "loss", "artifact": len(artifacts) - 1, "pred": pred, "label": label,
                              "states": states})
                refs.append(((dname, lname), active, python_loss_result(loss, pred, label, states)))
    results = run_cases(cpp_build, tmp_path_factory.mktemp("active_sets"), artifacts, cases)
    return list(zip(refs, results))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_native_loss_equals_python_eager_for_a_covering_set_of_active_components(active_set_results, dtype, layout):
    checked = 0
    for (key, active, ref), got in active_set_results:
        if key == (dtype, layout):
            assert_loss_result(got, ref, TOL[DTYPES[dtype]], f"{dtype} {layout} active={active}")
            checked += 1
    assert checked == len(SUBSETS)


def masks(shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    tiny = torch.rand(shape, generator=g) * torch.finfo(torch.float32).tiny  # subnormal float32 weights
    return {
        "per_element": torch.rand(shape, generator=g),
        "per_sample": torch.rand(shape[:-1], generator=g),
        "bool": torch.rand(shape, generator=g) > 0.5,
        "int": torch.randint(0, 3, shape[:-1], generator=g),
        "subnormal": torch.where(tiny > tiny.median(), tiny, torch.zeros_like(tiny)),
        "smallest_subnormal": torch.where(torch.rand(shape, generator=g) > 0.5, 1e-45, 0.0),
        "float64_tiny": torch.rand(shape[:-1], generator=g, dtype=torch.float64) * 1e-310,
        "half": torch.rand(shape, generator=g).half(),
        "all_zero": torch.zeros(shape),
    }


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_native_masked_mse_equals_python_eager_down_to_subnormal_weights(cpp_build, tmp_path, dtype):
    # The weights are divided by their largest first (in the mask's dtype), so tiny weights give the
    # same mse as any multiple of them: Σw·e / Σw is scale-free.
    loss = make_loss(dtype=DTYPES[dtype], lambdas=dict(lambda_mse=1.0, lambda_fr=0.1))
    pred, label, states = loss_inputs(loss)
    cases = [{"kind": "loss", "artifact": 0, "pred": pred, "label": label, "states": states, "mask": m}
             for m in masks(pred.shape).values()]
    results = run_cases(cpp_build, tmp_path, [native_payload(loss)], cases)
    for (name, mask), got in zip(masks(pred.shape).items(), results):
        ref = python_loss_result(loss, pred, label, states, mask)
        assert_loss_result(got, ref, TOL[DTYPES[dtype]], name)
        if name in ("subnormal", "smallest_subnormal", "float64_tiny"):
            # As with the weights scaled to max 1 in float64; the library divides in the mask's dtype,
            # one rounding per weight: the float32 masks' rtol is float32's.
            scaled = python_loss_result(loss, pred, label, states, mask.double() / mask.double().max())
            tol = TOL[torch.float32] if mask.dtype == torch.float32 else TOL[DTYPES[dtype]]
            torch.testing.assert_close(got[2][0], scaled[1][0], **tol, msg=name)
    assert results[-1][2][0] == 0 and torch.all(results[-1][3] == 0)  # Σw = 0: mse 0, zero gradient


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_native_loss_accumulates_half_precision_in_float32_like_python(cpp_build, tmp_path, dtype):
    loss = make_loss()
    pred, label, states = (t.to(dtype) for t in loss_inputs(loss))
    results = run_cases(cpp_build, tmp_path, [native_payload(loss)],
                        [{"kind": "loss", "artifact": 0, "pred": pred, "label": label, "states": states}])
    assert results[0][1].dtype == torch.float32
    # Both sides upcast the same half-precision values and compute in float32 (rtol 1e-5); the
    # gradients w.r.t. pred and states come back in their half dtype, rounded once from float32
    # values that agree to 1e-5: they agree to one rounding, rtol = that dtype's eps.
    assert_loss_result(results[0], python_loss_result(loss, pred, label, states), TOL[torch.float32], str(dtype),
                       input_tol=dict(rtol=torch.finfo(dtype).eps, atol=0.0))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_native_lambdas_stay_float64_and_exact_under_dtype_conversion(cpp_build, tmp_path, dtype):
    loss = make_loss(dtype=torch.float64, lambdas=dict(lambda_mse=0.1, lambda_fr=1 / 3))  # not exact in float32
    results = run_cases(cpp_build, tmp_path, [native_payload(loss)], [{"kind": "to_dtype", "artifact": 0,
                                                                      "dtype": dtype}])
    lambdas, weight = results[0][1], results[0][2]
    assert lambdas.dtype == torch.float64 and torch.equal(lambdas, loss.lambdas)
    assert weight.dtype == getattr(torch, dtype)


# ---- the model ----

FORWARD_CASES = [(a, variant, bf, d) for a in ACTIVATIONS for variant in ("plain", "masked")
                 for bf in (False, True) for d in (torch.float32, torch.float64)]


def test_native_ctrnn_forward_equals_python_for_every_activation(cpp_build, tmp_path):
    artifacts, cases, refs = [], [], []
    for activation, variant, batch_first, dtype in FORWARD_CASES:
        if variant == "masked":
            model = masked_model(activation, batch_first, dtype)
        else:
            torch.manual_seed(5)
            model = CTRNN((3, 10, 2), activation=activation, batch_first=batch_first).to(dtype)
        model.eval()  # noise off (there is none configured either)
        g = torch.Generator().manual_seed(11)
        lead = (4, 6) if batch_first else (6, 4)
        x = torch.randn(*lead, 3, generator=g, dtype=torch.float64).to(dtype)
        g_out = torch.randn(*lead, 2, generator=g, dtype=torch.float64).to(dtype)
        g_states = torch.randn(*lead, 10, generator=g, dtype=torch.float64).to(dtype)
        init = torch.randn(4, 10, generator=g, dtype=torch.float64).to(dtype) if variant == "plain" else None
        artifacts.append(native_payload(RNNLoss(model)))
        cases.append({"kind": "forward", "artifact": len(artifacts) - 1, "x": x, "init_state": init,
                      "g_out": g_out, "g_states": g_states})
        xr = x.clone().requires_grad_(True)
        output, states = model(xr, init)
        objective = (output * g_out).sum() + (states * g_states).sum()
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(objective, [xr] + [p for _, p in params])
        refs.append((output.detach(), states.detach(), grads[0], grads[1:], [n for n, _ in params]))
    results = run_cases(cpp_build, tmp_path, artifacts, cases)
    for case, got, (output, states, d_x, d_params, names) in zip(FORWARD_CASES, results, refs):
        tol = TOL[case[3]]
        assert got[0] == "ok", (case, got)
        assert list(got[5]) == names, case
        torch.testing.assert_close(got[1], output, **tol, msg=lambda m: f"{case} output: {m}")
        torch.testing.assert_close(got[2], states, **tol, msg=lambda m: f"{case} states: {m}")
        torch.testing.assert_close(got[3], d_x, **tol, msg=lambda m: f"{case} d/dx: {m}")
        for name, g, r in zip(names, got[4], d_params):
            torch.testing.assert_close(g, r, **tol, msg=lambda m: f"{case} d/d{name}: {m}")


def test_enforce_constraints_equals_python_and_keeps_pythons_parameter_names(cpp_build, tmp_path):
    model = masked_model("tanh")
    with torch.no_grad():  # break every constraint: random signs everywhere, α out of [1e-3, 1]
        for p in (model.recurrent_layer.input_layer.weight, model.recurrent_layer.hidden_layer.weight,
                  model.readout_layer.weight):
            p.normal_()
        model.recurrent_layer.alpha[:3] = torch.tensor([-0.5, 0.0, 2.0])
    results = run_cases(cpp_build, tmp_path, [native_payload(RNNLoss(model))], [{"kind": "constraints", "artifact": 0}])
    model.enforce_constraints()
    params = dict(model.named_parameters())
    status, values, names, flags = results[0]
    assert status == "ok" and list(names) == list(params)
    assert list(flags) == [p.requires_grad for p in params.values()]  # the "fixed" hidden bias is not trained
    # Element-wise products, clamps and selections only: the results are bitwise equal.
    for name, value in zip(names, values):
        assert torch.equal(value, params[name]), name


# ---- training: the C++ Adam trajectory from rnnloss::load follows Python eager ----

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_training_from_load_follows_the_python_adam_trajectory(cpp_build, tmp_path, dtype):
    steps, lr = 100, 1e-2
    model = masked_model("softplus", dtype=dtype)
    loss = RNNLoss(model, **ALL_ON)
    save_native(loss, tmp_path / NATIVE)
    g = torch.Generator().manual_seed(2)
    xs = torch.randn(steps, 8, 4, 3, generator=g, dtype=torch.float64).to(dtype)
    targets = torch.randn(steps, 8, 4, 2, generator=g, dtype=torch.float64).to(dtype)
    payload = torch.load(tmp_path / NATIVE, weights_only=True)  # the file rnnloss::load reads
    results = run_cases(cpp_build, tmp_path, [payload], [{"kind": "train", "artifact": 0, "xs": xs,
                                                          "targets": targets, "lr": lr}])
    status, totals, _, params, names = results[0]
    assert status == "ok"
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ref_totals = []
    for s in range(steps):
        output, states = model(xs[s])
        total, _ = loss(output, targets[s], states)
        opt.zero_grad()
        total.backward()
        model.apply_plasticity()
        opt.step()
        model.enforce_constraints()
        ref_totals.append(total.detach())
    # The two runs differ only in the rounding of a few sums: a few ulps (ε: 2.2e-16 float64,
    # 1.2e-7 float32) per step, on parameters of size <= 0.5. Added up over 100 steps that is at
    # most 100·4ε·0.5: 4.4e-14 (float64) and 2.4e-5 (float32) absolute; the losses likewise within
    # rtol 1e-10 / 1e-5. A different formula or update rule moves the loss by far more (it falls
    # from about 1.5 to 0.9 over these steps).
    tol = dict(rtol=1e-10, atol=5e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=2.5e-5)
    torch.testing.assert_close(totals, torch.stack(ref_totals), **tol)
    for name, value in zip(names, params):
        torch.testing.assert_close(value, dict(model.named_parameters())[name], **tol, msg=lambda m: f"{name}: {m}")
    assert ref_totals[-1] < 0.9 * ref_totals[0]  # it did train
