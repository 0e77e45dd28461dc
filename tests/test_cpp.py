"""The C++ side: the native library (rnnloss::CTRNN, rnnloss::RNNLoss, rnnloss::load) against Python
eager, the programs train_ctrnn and eval_loss with both engines, and the installed CMake package.

One cmake build per session (``build/``). The parity checks go through ``rnnloss_cases``, a test
driver that runs a whole list of cases in one process (tests write the list, read the results).
"""
import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import ALL_ON, ALL_SUBSETS, lambdas_for
from rnnloss import CTRNN, RNNLoss, export
from rnnloss.config import validate
from rnnloss.native import NATIVE, native_payload, save_native
from rnnloss.trainer import CTRNNTrainer

pytestmark = pytest.mark.cpp
ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build"
CONFIG = validate({"model": {"dims": [3, 32, 2]}, "example": {"time": 6, "batch": 3}})
ACTIVATIONS = ("relu", "tanh", "sigmoid", "softplus", "retanh")
# Python eager and libtorch run the same ATen kernels; the only differences are the order of a few
# float64 / float32 sums (the rate statistics). fp32: the parity suite's same-kernel rtol 1e-5;
# float64: its rtol 1e-10. atol: values are O(1), so a float32 entry that should be 0 may be off by
# a few ulps of O(1) terms (1e-7); float64 likewise 1e-14.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-7), torch.float64: dict(rtol=1e-10, atol=1e-14)}


@pytest.fixture(scope="session")
def programs():
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("cmake and a C++ compiler are needed to build cpp/")
    prefix = torch.utils.cmake_prefix_path
    subprocess.run(["cmake", "-S", str(ROOT / "cpp"), "-B", str(BUILD), f"-DCMAKE_PREFIX_PATH={prefix}"],
                   check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(BUILD), "-j", str(os.cpu_count() or 2)], check=True,
                   capture_output=True, text=True)
    return {"train_ctrnn": BUILD / "train_ctrnn", "eval_loss": BUILD / "eval_loss",
            "cases": BUILD / "rnnloss_cases"}


def run_cases(programs, tmp_path, artifacts, cases):
    """Run ``cases`` (dicts, see cpp/tests/rnnloss_cases.cpp) in one C++ process; one result each."""
    torch.save({"artifacts": artifacts, "cases": cases}, tmp_path / "cases.pt")
    subprocess.run([str(programs["cases"]), str(tmp_path / "cases.pt"), str(tmp_path / "results.pt")], check=True,
                   capture_output=True, text=True, timeout=300)
    results = torch.load(tmp_path / "results.pt", weights_only=True)
    assert len(results) == len(cases)
    return results


def python_error(fn):
    """(class name, message) of the exception ``fn`` raises in Python eager; ("ok", "") if none."""
    try:
        fn()
    except (TypeError, ValueError) as e:
        return type(e).__name__, str(e)
    return "ok", ""


def make_loss(dims=(3, 8, 2), dtype=torch.float32, batch_first=False, seed=0, lambdas=None, **kw):
    torch.manual_seed(seed)
    model = CTRNN(dims, batch_first=batch_first, **kw).to(dtype)
    return RNNLoss(model, **(ALL_ON if lambdas is None else lambdas))


def loss_inputs(loss, time=5, batch=3, seed=1):
    """pred, label, states in the model's layout and dtype; positive rates (μ well away from 0)."""
    g = torch.Generator().manual_seed(seed)
    m = loss.model
    lead = (batch, time) if m.batch_first else (time, batch)
    dtype = m.readout_layer.weight.dtype
    pred = torch.randn(*lead, m.n_out, generator=g, dtype=torch.float64).to(dtype)
    label = torch.randn(*lead, m.n_out, generator=g, dtype=torch.float64).to(dtype)
    states = torch.rand(*lead, m.n_hid, generator=g, dtype=torch.float64).to(dtype)
    return pred, label, states


def python_loss_result(loss, pred, label, states, mask=None):
    """total, components and d total / d (pred, states, trainable parameters), Python eager."""
    pred = pred.clone().requires_grad_(True)
    states = None if states is None else states.clone().requires_grad_(True)
    total, components = loss(pred, label, states, mask)
    params = [(n, p) for n, p in loss.model.named_parameters() if p.requires_grad]
    wrt = [pred] + ([states] if states is not None else []) + [p for _, p in params]
    grads = torch.autograd.grad(total, wrt, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]
    d_states = grads[1] if states is not None else None
    return total.detach(), components.detach(), grads[0], d_states, grads[-len(params):], [n for n, _ in params]


def assert_loss_result(got, ref, tol, where, input_tol=None):
    """C++ result ``got`` against Python's ``ref``; ``input_tol`` (default ``tol``) for d/dpred, d/dstates."""
    input_tol = input_tol or tol
    status, total, components, d_pred, d_states, d_params, names = got
    assert status == "ok", (where, got)
    r_total, r_comps, r_pred, r_states, r_params, r_names = ref
    assert list(names) == r_names, where
    torch.testing.assert_close(total, r_total, **tol, msg=lambda m: f"{where} total: {m}")
    assert torch.equal(components == 0, r_comps == 0), f"{where}: inactive components must be exactly 0"
    torch.testing.assert_close(components, r_comps, **tol, msg=lambda m: f"{where} components: {m}")
    torch.testing.assert_close(d_pred, r_pred, **input_tol, msg=lambda m: f"{where} d/dpred: {m}")
    if r_states is None:
        assert d_states is None, where
    else:
        torch.testing.assert_close(d_states, r_states, **input_tol, msg=lambda m: f"{where} d/dstates: {m}")
    for name, g, r in zip(names, d_params, r_params):
        torch.testing.assert_close(g, r, **tol, msg=lambda m: f"{where} d/d{name}: {m}")


# ---- the loss: all 127 active sets, float32 / float64, time-first / batch-first, one process ----

LAYOUTS = {"time_first": False, "batch_first": True}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@pytest.fixture(scope="module")
def active_set_results(programs, tmp_path_factory):
    """C++ and Python results for every (dtype, layout, active set), the C++ ones from one call."""
    artifacts, cases, refs = [], [], []
    for dname, dtype in DTYPES.items():
        for lname, batch_first in LAYOUTS.items():
            for active in ALL_SUBSETS:
                loss = make_loss(dtype=dtype, batch_first=batch_first, lambdas=lambdas_for(active))
                pred, label, states = loss_inputs(loss)
                if not any(i >= 4 for i in active):
                    states = None  # states are optional when no rate term is active
                artifacts.append(native_payload(loss))
                cases.append({"kind": "loss", "artifact": len(artifacts) - 1, "pred": pred, "label": label,
                              "states": states})
                refs.append(((dname, lname), active, python_loss_result(loss, pred, label, states)))
    results = run_cases(programs, tmp_path_factory.mktemp("active_sets"), artifacts, cases)
    return list(zip(refs, results))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_native_loss_equals_python_eager_for_every_active_set(active_set_results, dtype, layout):
    checked = 0
    for (key, active, ref), got in active_set_results:
        if key == (dtype, layout):
            assert_loss_result(got, ref, TOL[DTYPES[dtype]], f"{dtype} {layout} active={active}")
            checked += 1
    assert checked == 127


def test_native_masked_mse_equals_python_eager(programs, tmp_path):
    loss = make_loss(lambdas=dict(lambda_mse=1.0, lambda_fr=0.1))
    pred, label, states = loss_inputs(loss)
    g = torch.Generator().manual_seed(3)
    masks = {
        "per_element": torch.rand(pred.shape, generator=g),
        "per_sample": torch.rand(pred.shape[:-1], generator=g),
        "bool": torch.rand(pred.shape, generator=g) > 0.5,
        "int": torch.randint(0, 3, pred.shape[:-1], generator=g),
        "all_zero": torch.zeros(pred.shape),
    }
    cases = [{"kind": "loss", "artifact": 0, "pred": pred, "label": label, "states": states, "mask": m}
             for m in masks.values()]
    results = run_cases(programs, tmp_path, [native_payload(loss)], cases)
    for (name, mask), got in zip(masks.items(), results):
        assert_loss_result(got, python_loss_result(loss, pred, label, states, mask), TOL[torch.float32], name)
    assert results[-1][2][0] == 0 and torch.all(results[-1][3] == 0)  # Σw = 0: mse 0, zero gradient


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_native_loss_accumulates_half_precision_in_float32_like_python(programs, tmp_path, dtype):
    loss = make_loss()
    pred, label, states = (t.to(dtype) for t in loss_inputs(loss))
    results = run_cases(programs, tmp_path, [native_payload(loss)],
                        [{"kind": "loss", "artifact": 0, "pred": pred, "label": label, "states": states}])
    assert results[0][1].dtype == torch.float32
    # Both sides upcast the same half-precision values and compute in float32 (rtol 1e-5); the
    # gradients w.r.t. pred and states come back in their half dtype, rounded once from float32
    # values that agree to 1e-5: they agree to one rounding, rtol = that dtype's eps.
    assert_loss_result(results[0], python_loss_result(loss, pred, label, states), TOL[torch.float32], str(dtype),
                       input_tol=dict(rtol=torch.finfo(dtype).eps, atol=0.0))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_native_lambdas_stay_float64_and_exact_under_dtype_conversion(programs, tmp_path, dtype):
    loss = make_loss(dtype=torch.float64, lambdas=dict(lambda_mse=0.1, lambda_fr=1 / 3))  # not exact in float32
    results = run_cases(programs, tmp_path, [native_payload(loss)], [{"kind": "to_dtype", "artifact": 0,
                                                                      "dtype": dtype}])
    lambdas, weight = results[0][1], results[0][2]
    assert lambdas.dtype == torch.float64 and torch.equal(lambdas, loss.lambdas)
    assert weight.dtype == getattr(torch, dtype)


# ---- the model ----

def masked_model(activation, batch_first=False, dtype=torch.float32):
    """A CTRNN using every option the native model mirrors: masks, E/I signs (per neuron and per
    synapse), learnable α and v_0, an untrained bias."""
    torch.manual_seed(7)
    n_in, n_hid, n_out = 3, 10, 2
    sparse = (torch.rand(n_hid, n_hid) < 0.6).float()
    signs = torch.ones(n_hid)
    signs[7:] = -1.0
    in_signs = torch.randint(-1, 2, (n_hid, n_in)).float()
    model = CTRNN((n_in, n_hid, n_out), activation=activation, batch_first=batch_first, learn_alpha=True,
                  init_state="learn", biases=(True, None, "normal"), sparsity_masks=(None, sparse, None),
                  ei_masks=(in_signs, signs, signs), plasticity_masks=(None, None, torch.rand(n_out, n_hid)))
    with torch.no_grad():  # v_0 and α away from their initial values, so they matter
        model.recurrent_layer.hidden_state.uniform_(-0.5, 0.5)
        model.recurrent_layer.alpha.uniform_(0.05, 0.3)
    return model.to(dtype)


FORWARD_CASES = [(a, variant, bf, d) for a in ACTIVATIONS for variant in ("plain", "masked")
                 for bf in (False, True) for d in (torch.float32, torch.float64)]


def test_native_ctrnn_forward_equals_python_for_every_activation(programs, tmp_path):
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
    results = run_cases(programs, tmp_path, artifacts, cases)
    for case, got, (output, states, d_x, d_params, names) in zip(FORWARD_CASES, results, refs):
        tol = TOL[case[3]]
        assert got[0] == "ok", (case, got)
        assert list(got[5]) == names, case
        torch.testing.assert_close(got[1], output, **tol, msg=lambda m: f"{case} output: {m}")
        torch.testing.assert_close(got[2], states, **tol, msg=lambda m: f"{case} states: {m}")
        torch.testing.assert_close(got[3], d_x, **tol, msg=lambda m: f"{case} d/dx: {m}")
        for name, g, r in zip(names, got[4], d_params):
            torch.testing.assert_close(g, r, **tol, msg=lambda m: f"{case} d/d{name}: {m}")


def test_native_named_parameters_and_state_dict_keys_are_pythons(programs, tmp_path):
    model = masked_model("relu")
    results = run_cases(programs, tmp_path, [native_payload(RNNLoss(model))],
                        [{"kind": "constraints", "artifact": 0}])
    assert list(results[0][2]) == [name for name, _ in model.named_parameters()]


def test_enforce_constraints_equals_python(programs, tmp_path):
    model = masked_model("tanh")
    with torch.no_grad():  # break every constraint: random signs everywhere, α out of [1e-3, 1]
        for p in (model.recurrent_layer.input_layer.weight, model.recurrent_layer.hidden_layer.weight,
                  model.readout_layer.weight):
            p.normal_()
        model.recurrent_layer.alpha[:3] = torch.tensor([-0.5, 0.0, 2.0])
    results = run_cases(programs, tmp_path, [native_payload(RNNLoss(model))], [{"kind": "constraints", "artifact": 0}])
    model.enforce_constraints()
    # Element-wise products, clamps and selections only: the results are bitwise equal.
    for name, value in zip(results[0][2], results[0][1]):
        assert torch.equal(value, dict(model.named_parameters())[name]), name


# ---- errors: the same class and message as Python's ----

def test_errors_equal_pythons(programs, tmp_path):
    from test_mask import BAD_MASKS
    from test_validation import BAD_CALLS, LAMBDA_WRITES

    loss = make_loss()
    pred, label, states = loss_inputs(loss)
    artifacts = [native_payload(loss), native_payload(RNNLoss(loss.model, lambda_mse=1.0, lambda_fr=0.1,
                                                              lambda_fr_sd=0.1, lambda_fr_cv=0.1))]
    cases, expected = [], []

    def add(case, fn):
        cases.append(case)
        expected.append(python_error(fn))

    for name, (make_args, _, _) in BAD_CALLS.items():
        p, l, s = make_args(pred, label, states)
        add({"kind": "loss", "artifact": 0, "pred": p, "label": l, "states": s}, lambda p=p, l=l, s=s: loss(p, l, s))
    for name, (make_mask, _, _) in BAD_MASKS.items():
        mask = make_mask(pred)
        add({"kind": "loss", "artifact": 0, "pred": pred, "label": label, "states": states, "mask": mask},
            lambda mask=mask: loss(pred, label, states, mask))
    for name, (index, value, _) in LAMBDA_WRITES.items():
        rate_loss = RNNLoss(loss.model, lambda_mse=1.0, lambda_fr=0.1, lambda_fr_sd=0.1, lambda_fr_cv=0.1)
        lambdas = rate_loss.lambdas.clone()
        lambdas[index] = value

        def write_and_call(rate_loss=rate_loss, lambdas=lambdas):
            with torch.no_grad():
                rate_loss.lambdas.copy_(lambdas)
            rate_loss(pred, label, states)
        add({"kind": "loss", "artifact": 1, "pred": pred, "label": label, "states": states, "lambdas": lambdas},
            write_and_call)
    for name, value in [("fr", -1.0), ("fr", math.inf), ("fr", 1e39), ("fr", 0.1 + 0.2), ("rate", 0.1)]:
        add({"kind": "set_lambda", "artifact": 1, "name": name, "value": value},
            lambda name=name, value=value: RNNLoss(loss.model, lambda_fr=1.0).set_lambda(name, value))
    add({"kind": "set_lambda", "artifact": 1, "name": "in", "value": 0.5},
        lambda: RNNLoss(loss.model, lambda_fr=0.1).set_lambda("in", 0.5))
    for index, value in [(2, -0.1), (4, math.nan), (6, 1e39), (0, 1e-5 * 1.5)]:
        lambdas = [0.0] * 7
        lambdas[index] = value
        kwargs = dict(lambdas_for([]), **{list(ALL_ON)[index]: value})
        add({"kind": "loss_options", "artifact": 0, "lambdas": lambdas},
            lambda kwargs=kwargs: RNNLoss(loss.model, **kwargs))
    model = loss.model
    x = torch.randn(4, 2, 3)
    for args in [(x[0],), (x[..., :2],), (x.long(),), (x.double(),), (x, torch.zeros(2, 7))]:
        add({"kind": "forward", "artifact": 0, "x": args[0], "init_state": args[1] if len(args) > 1 else None,
             "g_out": torch.zeros(()), "g_states": torch.zeros(())}, lambda args=args: model(*args))
    for options in [dict(n_hid=0), dict(tau=0.0), dict(tau=-1e-5), dict(dt=200.0), dict(activation="gelu"),
                    dict(preact_noise=-1.0), dict(postact_noise=math.nan), dict(init_state="keep"),
                    dict(sparsity_masks=[None, torch.ones(8, 7), None]),
                    dict(ei_masks=[None, torch.full((8,), 2.0), None]),
                    dict(ei_masks=[torch.ones(2), None, None]),
                    dict(plasticity_masks=[None, None, -torch.ones(2, 8)])]:
        full = {"n_in": 3, "n_hid": 8, "n_out": 2, **options}
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in options.items() if k != "n_hid"}
        dims = (3, full["n_hid"], 2)
        add({"kind": "ctrnn", "options": full}, lambda dims=dims, kwargs=kwargs: CTRNN(dims, **kwargs))
    results = run_cases(programs, tmp_path, artifacts, cases)
    for case, (kind, message), got in zip(cases, expected, results):
        if kind == "ok":  # accepted by Python: accepted by C++
            assert got[0] == "ok", (case, got)
        else:
            assert tuple(got) == ("error", kind, message), case


def test_a_component_annealed_to_zero_stays_active_after_load(programs, tmp_path):
    loss = make_loss(lambdas=dict(lambda_mse=1.0, lambda_fr=0.25))
    loss.set_lambda("fr", 0.0)
    results = run_cases(programs, tmp_path, [native_payload(loss)],
                        [{"kind": "set_lambda", "artifact": 0, "name": "fr", "value": 0.5},
                         {"kind": "set_lambda", "artifact": 0, "name": "in", "value": 0.5}])
    assert results[0][0] == "ok" and results[0][1].tolist() == [1.0, 0, 0, 0, 0.5, 0, 0]
    assert results[1][:2] == ("error", "ValueError")  # 'in' was never active


def test_scripted_module_errors_reach_cpp_as_jit_exception_not_c10_error(programs, tmp_path):
    loss = make_loss()
    path = tmp_path / "loss.pt"
    export.export_torchscript(loss, path)
    pred, label, states = loss_inputs(loss)
    results = run_cases(programs, tmp_path, [], [
        {"kind": "torchscript", "path": str(path), "pred": pred, "label": label[:, :1], "states": states}])
    status, kind, message = results[0]
    assert (status, kind) == ("error", "torch::jit::JITException")
    assert message.rstrip().splitlines()[-1] == ("builtins.ValueError: pred and label must have the same shape, "
                                                 "got pred [5, 3, 2] and label [5, 1, 2]")


# ---- training: the C++ Adam trajectory from rnnloss::load follows Python eager ----

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_training_from_load_follows_the_python_adam_trajectory(programs, tmp_path, dtype):
    steps, lr = 100, 1e-2
    model = masked_model("softplus", dtype=dtype)
    loss = RNNLoss(model, **ALL_ON)
    save_native(loss, tmp_path / NATIVE)
    g = torch.Generator().manual_seed(2)
    xs = torch.randn(steps, 8, 4, 3, generator=g, dtype=torch.float64).to(dtype)
    targets = torch.randn(steps, 8, 4, 2, generator=g, dtype=torch.float64).to(dtype)
    payload = torch.load(tmp_path / NATIVE, weights_only=True)  # the file rnnloss::load reads
    results = run_cases(programs, tmp_path, [payload], [{"kind": "train", "artifact": 0, "xs": xs,
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
    # rtol 1e-10 / 1e-5. Measured on the 2-core CPU VM: 1.4e-15 and 5.1e-7 absolute on the
    # parameters, 3.7e-16 and 2.3e-7 relative on the losses. A different formula or update rule
    # moves the loss by far more (it falls from 1.48 to 0.89 over these steps).
    tol = dict(rtol=1e-10, atol=5e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=2.5e-5)
    torch.testing.assert_close(totals, torch.stack(ref_totals), **tol)
    for name, value in zip(names, params):
        torch.testing.assert_close(value, dict(model.named_parameters())[name], **tol, msg=lambda m: f"{name}: {m}")
    assert ref_totals[-1] < 0.9 * ref_totals[0]  # it did train


# ---- the programs ----

@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cpp") / "artifacts"
    folder.mkdir()
    loss = export.build(CONFIG)
    export.export_torchscript(loss, folder / export.LOSS_PT)
    export.export_torchscript(CTRNNTrainer(loss), folder / export.TRAIN_PT)
    save_native(loss, folder / NATIVE)
    return folder, loss


@pytest.mark.parametrize("engine", ["native", "torchscript"])
def test_eval_loss_writes_the_loss_gradients_of_python_eager(programs, artifacts, tmp_path, engine):
    folder, loss = artifacts
    pred, label, states = export.sample_inputs(loss, 9, 4, seed=5)
    torch.save({"pred": pred, "label": label, "states": states}, tmp_path / "in.pt")
    subprocess.run([str(programs["eval_loss"]), str(folder), str(tmp_path / "in.pt"), str(tmp_path / "out.pt"),
                    "--engine", engine], check=True, capture_output=True)
    got = dict(zip(("total", "components", "d_pred", "d_states"), torch.load(tmp_path / "out.pt", weights_only=True)))
    pred.requires_grad_(True)
    states.requires_grad_(True)
    total, comps = loss(pred, label, states)
    d_pred, d_states = torch.autograd.grad(total, (pred, states))  # d total, not d (total + Σ components)
    for key, ref in {"total": total, "components": comps, "d_pred": d_pred, "d_states": d_states}.items():
        torch.testing.assert_close(got[key], ref.detach(), **TOL[torch.float32], msg=key)


@pytest.mark.parametrize("engine", ["native", "torchscript"])
def test_eval_loss_reports_a_loss_error_in_one_line(programs, artifacts, tmp_path, engine):
    folder, loss = artifacts
    pred, label, states = export.sample_inputs(loss, 3, 2, seed=1)
    torch.save({"pred": pred, "label": label[:, :1], "states": states}, tmp_path / "in.pt")
    result = subprocess.run([str(programs["eval_loss"]), str(folder), str(tmp_path / "in.pt"),
                             str(tmp_path / "out.pt"), "--engine", engine], capture_output=True, text=True)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1 and "pred and label must have the same shape" in result.stderr


@pytest.mark.parametrize("inputs, problem", [
    (lambda p, l, s: p, "got a Tensor"),
    (lambda p, l, s: [p, l, s], "got a GenericList"),
    (lambda p, l, s: {"pred": p, "label": l}, "'states' is missing"),
    (lambda p, l, s: {"pred": p, "label": l, "states": s, "rates": s}, "unexpected key 'rates'"),
    (lambda p, l, s: {"pred": p, "label": l, "states": s.tolist()}, "got 'states' as a"),
], ids=["tensor", "list", "missing", "extra", "not_a_tensor"])
def test_eval_loss_refuses_inputs_that_are_not_a_dict_of_the_three_tensors(programs, artifacts, tmp_path, inputs,
                                                                           problem):
    folder, loss = artifacts
    torch.save(inputs(*export.sample_inputs(loss, 3, 2, seed=1)), tmp_path / "in.pt")
    result = subprocess.run([str(programs["eval_loss"]), str(folder), str(tmp_path / "in.pt"),
                             str(tmp_path / "out.pt")], capture_output=True, text=True)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "INPUTS must be a dict of the tensors 'pred', 'label' and 'states'" in result.stderr
    assert problem in result.stderr


@pytest.mark.parametrize("engine", ["native", "torchscript"])
@pytest.mark.parametrize("key", ["pred", "label", "states"])
def test_eval_loss_reports_the_loss_message_for_an_integer_input(programs, artifacts, tmp_path, engine, key):
    # Not torch's "Only Tensors of floating point ... can require gradients" from making a leaf of it.
    folder, loss = artifacts
    inputs = dict(zip(("pred", "label", "states"), export.sample_inputs(loss, 3, 2, seed=1)))
    inputs[key] = inputs[key].long()
    torch.save(inputs, tmp_path / "in.pt")
    result = subprocess.run([str(programs["eval_loss"]), str(folder), str(tmp_path / "in.pt"),
                             str(tmp_path / "out.pt"), "--engine", engine], capture_output=True, text=True)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert f"{key} must be a floating-point tensor (float16, bfloat16, float32 or float64), got dtype torch.int64" \
        in result.stderr


@pytest.mark.parametrize("write, problem", [
    (lambda i, path: torch.save(i, path, _use_new_zipfile_serialization=False),
     "is in torch.save's legacy format (_use_new_zipfile_serialization=False)"),
    (lambda i, path: torch.save(dict(i, pred=i["pred"].to_sparse()), path), "holds a sparse tensor"),
    (lambda i, path: path.write_bytes(b"pred,label,states\n"), "is not a torch.save file (not a zip archive)"),
], ids=["legacy", "sparse", "text"])
def test_eval_loss_says_why_it_cannot_read_inputs(programs, artifacts, tmp_path, write, problem):
    folder, loss = artifacts
    write(dict(zip(("pred", "label", "states"), export.sample_inputs(loss, 3, 2, seed=1))), tmp_path / "in.pt")
    result = subprocess.run([str(programs["eval_loss"]), str(folder), str(tmp_path / "in.pt"),
                             str(tmp_path / "out.pt")], capture_output=True, text=True)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert f"cannot read {tmp_path / 'in.pt'}: it {problem}" in result.stderr


@pytest.mark.parametrize("missing", ["inputs", "artifact"])
def test_eval_loss_names_the_file_it_cannot_open(programs, artifacts, tmp_path, missing):
    folder, loss = artifacts
    inputs = tmp_path / "in.pt"
    torch.save(dict(zip(("pred", "label", "states"), export.sample_inputs(loss, 3, 2, seed=1))), inputs)
    if missing == "inputs":
        inputs = tmp_path / "absent.pt"
        expected = f"eval_loss: cannot read INPUTS {inputs}\n"
    else:
        folder = tmp_path / "empty"
        folder.mkdir()
        expected = (f"eval_loss: rnnloss::load: cannot read {folder / NATIVE} (the export command writes it; "
                    "from Python: rnnloss.native.save_native(loss, path))\n")
    result = subprocess.run([str(programs["eval_loss"]), str(folder), str(inputs), str(tmp_path / "out.pt")],
                            capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (1, expected)


@pytest.mark.parametrize("change, problem", [
    (lambda p: p["loss"].update(component_names=["mse", "in", "hid", "out", "rate", "fr_sd", "fr_cv"]),
     "'loss.component_names' is ['mse', 'in', 'hid', 'out', 'rate', 'fr_sd', 'fr_cv'], this library's are "
     "['mse', 'in', 'hid', 'out', 'fr', 'fr_sd', 'fr_cv']: it was written by another version of rnnloss"),
    (lambda p: p["loss"]["lambdas"].__setitem__(4, 0.3),
     "gives lambdas[4] ('fr') = 0.3, but component 'fr' is inactive"),
    (lambda p: p["loss"]["lambdas"].__setitem__(0, -1.0),
     "gives lambdas[0] ('mse') = -1.0; a lambda must be finite, >= 0 and at most float32's largest value"),
    (lambda p: p.update(version="1"), "has format version '1' (a string); this library reads version 1"),
    (lambda p: p.update(version=2), "has format version 2; this library reads version 1"),
    (lambda p: p["state_dict"].update({"readout_layer.weight": torch.zeros(2, 8, dtype=torch.int64)}),
     "'state_dict.readout_layer.weight' must be a floating-point tensor, got dtype torch.int64"),
    # Checked against the weights before a model of that size is allocated.
    (lambda p: p["model"].update(dims=[3, 2**62, 2]),
     "'model.dims' is [3, 4611686018427387904, 2] but 'state_dict.recurrent_layer.input_layer.weight' has shape "
     "[8, 3]"),
    # Python pickles 10**12 in 6 bytes; libtorch's unpickler reads only 8-byte ints and fails first.
    (lambda p: p["model"].update(dims=[3, 10**12, 2]), "it holds an integer of magnitude 2^31 or more that "
     "libtorch's unpickler cannot read (Expected length to be 8, got 6)"),
], ids=["component_names", "inactive_lambda", "negative_lambda", "version_str", "version_2", "int_tensor",
        "absurd_dims", "unpicklable_dims"])
def test_load_refuses_an_inconsistent_native_artifact(programs, tmp_path, change, problem):
    loss = make_loss(lambdas=dict(lambda_mse=1.0, lambda_in=0.1))  # dims (3, 8, 2); 'fr' inactive
    payload = native_payload(loss)
    change(payload)
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save(payload, bad / NATIVE)
    torch.save(dict(zip(("pred", "label", "states"), export.sample_inputs(loss, 3, 2, seed=1))), tmp_path / "in.pt")
    result = subprocess.run([str(programs["eval_loss"]), str(bad), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"eval_loss: rnnloss::load: {bad / NATIVE}") or \
        result.stderr.startswith(f"eval_loss: rnnloss::load: cannot read {bad / NATIVE}: ")
    assert problem in result.stderr


def test_load_wraps_the_unpicklers_message(programs, artifacts, tmp_path):
    folder, loss = artifacts
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / NATIVE).write_bytes(b"not a zip")
    torch.save(dict(zip(("pred", "label", "states"), export.sample_inputs(loss, 3, 2, seed=1))), tmp_path / "in.pt")
    result = subprocess.run([str(programs["eval_loss"]), str(bad), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                            capture_output=True, text=True)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert f"rnnloss::load: cannot read {bad / NATIVE}: it is not a torch.save file (not a zip archive)" \
        in result.stderr


@pytest.mark.parametrize("engine", ["native", "torchscript"])
def test_train_ctrnn_halves_the_mse_anneals_and_keeps_the_masks(programs, tmp_path, engine):
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
    save_native(loss, folder / NATIVE)
    out = tmp_path / "trained.pt"
    result = subprocess.run([str(programs["train_ctrnn"]), str(folder), "--engine", engine, "--steps", "200",
                             "--out", str(out), "--log-every", "50"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"initial_mse=(\S+) final_mse=(\S+) steps=200", summary)
    assert m and float(m.group(2)) <= 0.5 * float(m.group(1))
    assert "fr_sd=" in result.stdout and "step 50 " in result.stdout
    if engine == "torchscript":
        trained = torch.jit.load(str(out)).loss
    else:  # the loss's state_dict as (name, tensor) pairs
        trained = RNNLoss(CTRNN((3, n_hid, 2), sparsity_masks=(None, hid_mask, None), ei_masks=(None, signs, signs)),
                          lambda_hid=1e-3, lambda_fr=1e-2, lambda_fr_sd=1e-2)
        trained.load_state_dict(dict(torch.load(out, weights_only=True)))
    w_hid = trained.model.recurrent_layer.hidden_layer.weight
    w_out = trained.model.readout_layer.weight
    assert torch.all(w_hid[hid_mask == 0] == 0)
    assert torch.all(w_hid[:, :24] >= 0) and torch.all(w_hid[:, 24:] <= 0)
    assert torch.all(w_out[:, :24] >= 0) and torch.all(w_out[:, 24:] <= 0)
    assert not torch.equal(w_hid, model.recurrent_layer.hidden_layer.weight)  # it did train
    # λ_fr was annealed to a tenth of its initial value, and took effect.
    assert trained.lambdas[4].item() == pytest.approx(1e-3, rel=1e-12)
    last_log = [line for line in result.stdout.splitlines() if line.startswith("step 200 ")]
    assert len(last_log) == 1 and last_log[0].endswith("lambda_fr=0.001")
    assert re.search(r"^ms_per_step=\d", result.stdout, flags=re.M)


def test_train_ctrnn_says_why_when_the_mse_did_not_halve(programs, artifacts, tmp_path):
    folder, _ = artifacts
    result = subprocess.run([str(programs["train_ctrnn"]), str(folder), "--steps", "1", "--out",
                             str(tmp_path / "t.pt")], capture_output=True, text=True)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1 and "did not halve" in result.stderr


@pytest.mark.parametrize("args, status, why", [
    ([], 2, "the first argument must be the artifact folder"),
    (["{tmp}", "--device", "tpu"], 2, "--device must be cpu or cuda, got 'tpu'"),
    (["{tmp}", "--engine", "onnx"], 2, "--engine must be native or torchscript, got 'onnx'"),
    (["{tmp}", "--steps", "ten"], 2, "--steps must be an integer > 0, got 'ten'"),
    (["{tmp}", "--steps"], 2, "--steps needs a value"),
    (["{tmp}", "--speed", "1"], 2, "unknown argument --speed"),
    (["{tmp}"], 1, "rnnloss_native.pt"),
    (["{tmp}", "--engine", "torchscript"], 1, "ctrnn_train.pt"),
    # Beyond int64: strtoll saturated at 2^63 - 1 and the run went on (practically forever).
    (["{tmp}", "--steps", "99999999999999999999999"], 2, "--steps must be an integer > 0, got '9999"),
    (["{tmp}", "--seed", "-99999999999999999999999"], 2, "--seed must be an integer, got '-9999"),
    (["{tmp}", "--time", "99999999999999999999999"], 2, "--time must be an integer >= 5, got '9999"),
    (["{tmp}", "--batch", " 4"], 2, "--batch must be an integer > 0, got ' 4'"),  # strtoll skipped spaces
    (["{tmp}", "--log-every", "+5"], 2, "--log-every must be an integer > 0, got '+5'"),
    (["{tmp}", "--steps", "0"], 2, "--steps must be an integer > 0, got '0'"),
    # --out is checked before anything is loaded or trained, not when the model is saved.
    (["{tmp}", "--out", "{tmp}/missing/trained.pt"], 2, "--out {tmp}/missing/trained.pt: folder {tmp}/missing does not exist"),
    (["{tmp}", "--out", "{tmp}"], 2, "--out {tmp}: is a folder"),
], ids=["none", "device", "engine", "steps", "no_value", "unknown", "no_native", "no_torchscript", "steps_overflow",
        "seed_overflow", "time_overflow", "batch_space", "log_every_plus", "steps_zero", "out_no_folder",
        "out_is_folder"])
def test_train_ctrnn_rejects_bad_arguments_in_one_line(programs, tmp_path, args, status, why):
    result = subprocess.run([str(programs["train_ctrnn"])] + [a.format(tmp=tmp_path) for a in args],
                            capture_output=True, text=True)
    assert result.returncode == status and len(result.stderr.splitlines()) == 1, result.stderr
    assert why.format(tmp=tmp_path) in result.stderr


def test_train_ctrnn_refuses_an_unwritable_out_folder_before_training(programs, artifacts, tmp_path):
    folder, _ = artifacts
    base = Path(tempfile.mkdtemp())  # pytest's tmp_path is private to its user; this one is not
    base.chmod(0o755)
    locked = base / "locked"
    locked.mkdir(mode=0o555)
    as_user = []
    if os.geteuid() == 0:  # root writes anywhere: run as nobody
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: root may write into a read-only folder")
        as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        probe = subprocess.run(as_user + [str(programs["train_ctrnn"]), "--help"], capture_output=True, text=True)
        if probe.returncode != 0:  # e.g. the checkout lies in a folder of mode 0700 (mktemp -d)
            shutil.rmtree(base)
            pytest.skip(f"nobody cannot run {programs['train_ctrnn']} from where it was built: "
                        f"{probe.stderr.strip()[:160]}")
    result = subprocess.run(as_user + [str(programs["train_ctrnn"]), str(folder), "--steps", "1", "--out",
                                       str(locked / "t.pt")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == "", result.stdout  # nothing trained
    shutil.rmtree(base)
    assert result.stderr == f"train_ctrnn: --out {locked / 't.pt'}: folder {locked} is not writable\n"


@pytest.mark.parametrize("engine, name", [("native", "ctrnn_trained_native.pt"), ("torchscript", "ctrnn_trained.pt")])
def test_train_ctrnn_writes_into_the_current_folder_by_default_not_the_export(programs, artifacts, tmp_path, engine,
                                                                             name):
    # A file of ours in the export folder would make the next `rnnloss-export --force` refuse it.
    folder, _ = artifacts
    before = sorted(p.name for p in folder.iterdir())
    result = subprocess.run([str(programs["train_ctrnn"]), str(folder), "--engine", engine, "--steps", "1"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1 and "did not halve" in result.stderr  # one step: it saves, then says so
    assert f"saved ./{name}" in result.stdout and (tmp_path / name).is_file()
    assert sorted(p.name for p in folder.iterdir()) == before


@pytest.mark.parametrize("program", ["train_ctrnn", "eval_loss"])
def test_help_prints_usage_and_exits_0(programs, program):
    result = subprocess.run([str(programs[program]), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith(f"usage: {program} ") and result.stderr == ""
    assert "--engine native|torchscript" in result.stdout


# ---- the installed CMake package ----

def test_installed_headers_use_no_torchscript(programs, tmp_path):
    subprocess.run(["cmake", "--install", str(BUILD), "--prefix", str(tmp_path)], check=True, capture_output=True)
    headers = sorted((tmp_path / "include" / "rnnloss").glob("*.h"))
    assert {h.name for h in headers} == {"rnnloss.h", "ctrnn.h", "loss.h", "load.h"}
    for header in headers:
        text = header.read_text()
        assert "torch/script.h" not in text and "jit" not in text, header


@pytest.mark.slow
def test_find_package_builds_and_trains_an_outside_project(programs, tmp_path):
    prefix = tmp_path / "prefix"
    subprocess.run(["cmake", "--install", str(BUILD), "--prefix", str(prefix)], check=True, capture_output=True)
    app = tmp_path / "app"
    app.mkdir()
    (app / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(app CXX)\nfind_package(rnnloss REQUIRED)\n"
        "add_executable(app main.cpp)\ntarget_link_libraries(app rnnloss::rnnloss)\n")
    (app / "main.cpp").write_text(r"""
#include <rnnloss/rnnloss.h>
#include <torch/torch.h>
#include <iostream>
int main() {
  torch::manual_seed(0);
  rnnloss::CTRNN model(rnnloss::CTRNNOptions(3, 16, 2).tau(100.0).dt(10.0).activation("tanh"));
  rnnloss::RNNLoss loss(model, rnnloss::RNNLossOptions().lambda_mse(1.0).lambda_fr(0.01));
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(1e-2));
  auto x = torch::randn({20, 4, 3}), target = torch::randn({20, 4, 2});
  double first = 0, last = 0;
  for (int step = 0; step < 30; ++step) {
    auto [output, states] = model->forward(x);
    auto [total, components] = loss->forward(output, target, states);
    opt.zero_grad();
    total.backward();
    opt.step();
    model->enforce_constraints();
    (step == 0 ? first : last) = total.item<double>();
  }
  std::cout << first << " " << last << "\n";
  return last < first ? 0 : 1;
}
""")
    configure = subprocess.run(["cmake", "-S", str(app), "-B", str(app / "build"),
                                f"-DCMAKE_PREFIX_PATH={prefix};{torch.utils.cmake_prefix_path}"],
                               check=True, capture_output=True, text=True)
    # A fresh configure runs TorchConfig.cmake's library lookups: its "library kineto not found"
    # warning is answered by rnnlossTorch.cmake (kineto is inside libtorch_cpu in the wheels).
    assert "kineto" not in configure.stdout + configure.stderr
    subprocess.run(["cmake", "--build", str(app / "build")], check=True, capture_output=True, text=True)
    result = subprocess.run([str(app / "build" / "app")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
