"""Every documented misuse raises a message naming the argument, expected and given value —
the same text from the eager and the scripted module."""
import math

import pytest
import torch

from conftest import ALL_ON, make_inputs, make_model, readback_as_on_a_gpu
from rnnloss import CTRNN, RNNLoss


def test_misspelled_lambda_is_a_type_error_listing_valid_names(model):
    with pytest.raises(TypeError) as err:
        RNNLoss(model, lamda_fr=0.1)
    msg = str(err.value)
    assert "'lamda_fr'" in msg and "did you mean 'lambda_fr'" in msg
    assert all(name in msg for name in ("lambda_mse", "lambda_in", "lambda_fr_cv"))


@pytest.mark.parametrize("value", [-0.1, math.nan, math.inf, -math.inf])
def test_negative_or_non_finite_lambda_is_a_value_error(model, value):
    with pytest.raises(ValueError, match=r"lambda_hid must be finite and >= 0, got"):
        RNNLoss(model, lambda_hid=value)


@pytest.mark.parametrize("value", ["0.1", None, True, torch.tensor(0.1)], ids=["str", "None", "bool", "tensor"])
def test_non_number_lambda_is_a_type_error(model, value):
    with pytest.raises(TypeError, match="lambda_fr must be a real number"):
        RNNLoss(model, lambda_fr=value)


@pytest.mark.parametrize("model", [torch.nn.Linear(2, 2), None, "ctrnn"], ids=["Linear", "None", "str"])
def test_model_that_is_not_a_ctrnn_is_a_type_error(model):
    with pytest.raises(TypeError, match="model must be a CTRNN"):
        RNNLoss(model)


def test_ctrnn_subclass_is_accepted():
    class MyRNN(CTRNN):
        pass

    loss = RNNLoss(MyRNN((1, 4, 1)), lambda_hid=1.0)
    torch.jit.script(loss)


def _inputs():
    model = make_model((3, 8, 2))
    pred, label, states = make_inputs(model)
    return model, pred, label, states


BAD_CALLS = {
    "shape_mismatch": (lambda p, l, s: (p, l[:, :2], s), ValueError,
                       "pred and label must have the same shape, got pred [5, 3, 2] and label [5, 2, 2]"),
    "no_broadcast": (lambda p, l, s: (p, l[:1], s), ValueError, "pred and label must have the same shape"),
    "states_missing": (lambda p, l, s: (p, l, None), ValueError,
                       "states is required when lambda_fr, lambda_fr_sd or lambda_fr_cv > 0, got None"),
    "states_wrong_hidden": (lambda p, l, s: (p, l, s[..., :5]), ValueError,
                            "states must have N_hid=8 as its last dimension, got shape [5, 3, 5]"),
    "states_scalar": (lambda p, l, s: (p, l, s[0, 0, 0]), ValueError, "states must have N_hid=8"),
    "pred_int": (lambda p, l, s: (p.long(), l, s), TypeError,
                 "pred must be a floating-point tensor (float16, bfloat16, float32 or float64), got dtype torch.int64"),
    "label_bool": (lambda p, l, s: (p, l > 0, s), TypeError, "label must be a floating-point tensor"),
    "states_int": (lambda p, l, s: (p, l, s.int()), TypeError, "states must be a floating-point tensor"),
    "pred_empty": (lambda p, l, s: (p[:0], l[:0], s), ValueError, "pred must not be empty, got shape [0, 3, 2]"),
    "states_empty": (lambda p, l, s: (p, l, s[:, :0]), ValueError, "states must not be empty, got shape [5, 0, 8]"),
}


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_raises_the_same_message_eager_and_scripted(case, scripted, tmp_path):
    from conftest import script_roundtrip
    make_args, exc, message = BAD_CALLS[case]
    model, pred, label, states = _inputs()
    loss = RNNLoss(model, **ALL_ON)
    if scripted:
        loss = script_roundtrip(loss, tmp_path)
        exc = torch.jit.Error  # TorchScript re-raises as torch.jit.Error carrying the same text
    with pytest.raises(exc) as err:
        loss(*make_args(pred, label, states))
    assert message in str(err.value)


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
@pytest.mark.parametrize("case", ["wrong_rank", "wrong_inputs", "int", "wrong_dtype", "init_state"])
def test_model_bad_input_raises_eager_and_scripted(case, scripted, tmp_path):
    from conftest import script_roundtrip
    model = make_model((3, 8, 2))
    x = torch.randn(4, 2, 3)
    args, exc, message = {
        "wrong_rank": ((x[0],), ValueError, "x must have shape (T, B, N_in) with N_in=3, got shape [2, 3]"),
        "wrong_inputs": ((x[..., :2],), ValueError, "with N_in=3, got shape [4, 2, 2]"),
        "int": ((x.long(),), TypeError, "x must be a floating-point tensor"),
        "wrong_dtype": ((x.double(),), TypeError, "x must have the model's dtype torch.float32, got dtype torch.float64"),
        "init_state": ((x, torch.zeros(2, 7)), ValueError, "init_state must have shape [B, N_hid] = [2, 8], got shape [2, 7]"),
    }[case]
    if scripted:
        model = script_roundtrip(model, tmp_path)
        exc = torch.jit.Error
    with pytest.raises(exc) as err:
        model(*args)
    assert message in str(err.value)


@pytest.mark.parametrize("kwargs, exc, message", [
    (dict(dims=(3, 0, 2)), ValueError, "dims must be a sequence (N_in, N_hid, N_out) of three positive ints"),
    (dict(dims=(3, 2)), ValueError, "dims must be"),
    (dict(dims=(3, 8, 2), tau=0.0), ValueError, "tau must be a finite number > 0, got 0.0"),
    (dict(dims=(3, 8, 2), dt=200.0), ValueError, "dt must not exceed tau"),
    (dict(dims=(3, 8, 2), activation="gelu"), ValueError, "activation must be one of"),
    (dict(dims=(3, 8, 2), preact_noise=-1.0), ValueError, "preact_noise must be a finite number >= 0"),
    (dict(dims=(3, 8, 2), weights="xavier"), ValueError, "weights for the input layer must be one of"),
    (dict(dims=(3, 8, 2), sparsity_masks=(None, torch.ones(8, 7), None)), ValueError,
     "sparsity_masks for the hidden layer must have shape [8, 8], got [8, 7]"),
    (dict(dims=(3, 8, 2), ei_masks=(None, torch.full((8,), 2.0), None)), ValueError,
     "ei_masks for the hidden layer must hold only +1, -1 and 0"),
])
def test_ctrnn_constructor_rejects_bad_arguments(kwargs, exc, message):
    dims = kwargs.pop("dims")
    with pytest.raises(exc) as err:
        CTRNN(dims, **kwargs)
    assert message in str(err.value)


# λ: finite in float32 at construction and in set_lambda; the buffer re-validated after writes.

def test_lambda_beyond_float32_is_refused_at_construction_and_by_set_lambda(model):
    with pytest.raises(ValueError, match=r"lambda_fr must be finite in float32"):
        RNNLoss(model, lambda_fr=1e39)
    loss = RNNLoss(model, lambda_fr=0.1)
    with pytest.raises(ValueError, match=r"set_lambda: value for 'fr' must be finite \(in float32\) and >= 0"):
        loss.set_lambda("fr", 1e39)
    RNNLoss(model, lambda_fr=3.4e38)  # the largest float32 values are fine


LAMBDA_WRITES = {
    "negative": (4, -1.0, "lambdas[4] ('fr') must be finite and >= 0; it was set to a negative value"),
    "nan": (5, math.nan, "lambdas[5] ('fr_sd') must be finite and >= 0; it was set to NaN"),
    "inf": (0, math.inf, "lambdas[0] ('mse') must be finite and >= 0; it was set to a value beyond float32's range"),
    "beyond_float32": (6, 1e39, "it was set to a value beyond float32's range"),
    "inactive": (1, 0.3, "lambdas[1] ('in') is non-zero but component 'in' is inactive (its lambda was 0 at "
                         "construction); build the loss with a non-zero lambda_in"),
}


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
@pytest.mark.parametrize("case", list(LAMBDA_WRITES))
def test_bad_value_written_into_lambdas_makes_forward_raise(case, scripted, tmp_path):
    from conftest import script_roundtrip
    index, value, message = LAMBDA_WRITES[case]
    model, pred, label, states = _inputs()
    loss = RNNLoss(model, lambda_mse=1.0, lambda_fr=0.1, lambda_fr_sd=0.1, lambda_fr_cv=0.1)
    exc = ValueError
    if scripted:
        loss = script_roundtrip(loss, tmp_path)
        exc = torch.jit.Error
    loss(pred, label, states)  # validated once
    with torch.no_grad():
        loss.lambdas[index] = value
    with pytest.raises(exc) as err:
        loss(pred, label, states)
    assert message in str(err.value)
    with torch.no_grad():  # a valid value written back is accepted again
        loss.lambdas[index] = 0.0 if case == "inactive" else 0.5
    loss(pred, label, states)


def test_lambdas_are_read_back_only_after_a_write_where_that_costs_a_synchronisation(monkeypatch):
    # On CUDA a read-back is a host-device synchronisation: forward must not do one per call. The
    # CPU checks every call (free there); pretend it is not free to exercise the CUDA logic here.
    model, pred, label, states = _inputs()
    loss = RNNLoss(model, **ALL_ON)
    reads = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or original(t))
    loss(pred, label, states)
    loss(pred, label, states)
    assert reads.count(torch.Size([7])) == 2  # the CPU: every call
    reads.clear()
    readback_as_on_a_gpu(monkeypatch)
    for _ in range(3):
        loss(pred, label, states)
    assert reads.count(torch.Size([7])) == 1  # the first call: nothing validated off the CPU yet
    loss.set_lambda("fr", 0.2)
    loss(pred, label, states)
    loss(pred, label, states)
    assert reads.count(torch.Size([7])) == 2  # then only after the write


def test_state_dict_with_a_nonzero_lambda_for_an_inactive_component_is_refused(model):
    trained = RNNLoss(model, lambda_fr=0.3)
    target = RNNLoss(model)  # fr inactive
    with pytest.raises(ValueError, match=r"state_dict gives lambdas\[4\] \('fr'\) = 0.3, but component 'fr' is "
                                         r"inactive in this loss"):
        target.load_state_dict(trained.state_dict())
    RNNLoss(model, lambda_fr=0.01).load_state_dict(trained.state_dict())  # active: loads


@pytest.mark.parametrize("convert", ["float", "half", "double", "bfloat16"])
def test_lambdas_stay_float64_and_exact_under_dtype_conversion(model, convert):
    loss = getattr(RNNLoss(model, lambda_fr=0.01), convert)()
    assert loss.lambdas.dtype == torch.float64 and loss.lambdas[4].item() == 0.01


def test_a_loss_built_on_a_meta_model_keeps_real_lambdas_and_materialises():
    # The λ buffer follows the model's device (no copy per call on a GPU), except meta: λ are
    # values given at construction, so they stay real on the CPU and survive to_empty.
    real = RNNLoss(make_model((3, 8, 2)), **ALL_ON)
    loss = RNNLoss(make_model((3, 8, 2)).to("meta"), **ALL_ON)
    assert loss.lambdas.device.type == "cpu"
    torch.testing.assert_close(loss.lambdas, real.lambdas, rtol=0, atol=0)
    loss.to_empty(device="cpu")
    torch.testing.assert_close(loss.lambdas, real.lambdas, rtol=0, atol=0)
    loss.load_state_dict(real.state_dict())
    pred, label, states = make_inputs(real.model, 4, 3)
    torch.testing.assert_close(loss(pred, label, states)[1], real(pred, label, states)[1], rtol=0, atol=0)



def test_a_loss_moved_to_meta_materialises_with_lambdas_that_forward_refuses_until_loaded():
    # .to("meta") drops every value; to_empty() must not fail on the λ buffer (the usual
    # materialise-then-load flow), and the uninitialised λ must never be used: NaN until loaded.
    real = RNNLoss(make_model((3, 8, 2)), **ALL_ON)
    loss = RNNLoss(make_model((3, 8, 2)), **ALL_ON).to("meta")
    loss.to_empty(device="cpu")
    assert loss.lambdas.dtype == torch.float64 and loss.lambdas.device.type == "cpu"
    pred, label, states = make_inputs(real.model, 4, 3)
    with pytest.raises(ValueError, match=r"lambdas\[0\] \('mse'\) must be finite and >= 0; it was set to NaN"):
        loss(pred, label, states)
    loss.load_state_dict(real.state_dict())
    torch.testing.assert_close(loss(pred, label, states)[1], real(pred, label, states)[1], rtol=0, atol=0)


@pytest.mark.parametrize("readback", ["cpu_logic", "gpu_logic"])
def test_a_loss_built_in_inference_mode_and_functional_calls_on_the_lambdas_work(readback, monkeypatch):
    # λ without a version counter (made under inference_mode) or without storage (torch.func's
    # wrappers) are read in every call, on the CPU and where values are otherwise read back only
    # after a change.
    if readback == "gpu_logic":
        readback_as_on_a_gpu(monkeypatch)
    model, pred, label, states = _inputs()
    with torch.inference_mode():
        loss = RNNLoss(model, **ALL_ON)
        total = loss(pred, label, states)[0]
    reference = RNNLoss(model, **ALL_ON)
    assert total.item() == reference(pred, label, states)[0].item()
    params = {"lambdas": reference.lambdas.clone()}
    grad = torch.func.grad(lambda b: torch.func.functional_call(reference, b, (pred, label, states))[0])(params)
    torch.testing.assert_close(grad["lambdas"], reference(pred, label, states)[1] / reference.lambdas.clamp_min(1e-300)
                               * (reference.lambdas != 0), rtol=1e-6, atol=0)


def test_moving_or_scripting_the_loss_forgets_the_validated_buffer(monkeypatch):
    # Off the CPU the last validated buffer is held to tell a new one from it; a move must not keep
    # a reference to a buffer of the old device (it would go into a saved file), and the buffer after
    # the move is validated again.
    model, pred, label, states = _inputs()
    loss = RNNLoss(model, **ALL_ON)
    readback_as_on_a_gpu(monkeypatch)
    loss(pred, label, states)
    assert loss._lambda_checked is loss.lambdas
    loss.double()
    assert loss._lambda_checked.numel() == 0
    loss.float()(pred, label, states)
    assert loss._lambda_checked is loss.lambdas
    loss.__prepare_scriptable__()
    assert loss._lambda_checked.numel() == 0

def test_writes_that_bypass_the_version_counter_are_caught_on_the_cpu():
    # On the CPU the buffer is checked in every call (no synchronisation to save there).
    model, pred, label, states = _inputs()
    loss = RNNLoss(model, **ALL_ON)
    loss(pred, label, states)
    loss.lambdas.data[4] = -1.0
    with pytest.raises(ValueError, match=r"lambdas\[4\] \('fr'\) must be finite and >= 0"):
        loss(pred, label, states)
    loss.lambdas.data[4] = 0.1
    loss.lambdas.numpy()[5] = math.nan
    with pytest.raises(ValueError, match=r"lambdas\[5\] \('fr_sd'\) must be finite and >= 0; it was set to NaN"):
        loss(pred, label, states)



_CHANGED_SCRIPTED = """
import io, sys, torch
import rnnloss.loss
from rnnloss import RNNLoss
sys.path.insert(0, {tests!r})
from conftest import ALL_ON, make_inputs, make_model, never_free
if {gpu_logic!r}:
    rnnloss.loss._readback_is_free = never_free  # before anything is scripted: compiled in
model = make_model((3, 8, 2))
pred, label, states = make_inputs(model, 5, 3)
base = torch.jit.script(RNNLoss(model, **ALL_ON))


def saved_and_loaded(module):
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def fresh():
    loaded = saved_and_loaded(base)
    loaded(pred, label, states)  # validated once
    return loaded


def half(m):  # converts every floating buffer: a new float16 λ, its version counter 0 again
    m.half()
    return m, (pred.half(), label.half(), states.half())


def written_then_moved(m):  # as .cuda() after a write on the CPU: new tensors, version 0 again
    m.lambdas[5] = -0.5
    m._apply(lambda t: t.clone())
    return m, (pred, label, states)


def assigned(m):
    m.lambdas = torch.tensor([1.0, 1e-3, 1e-3, 1e-3, 1e-2, float("nan"), 1e-2], dtype=torch.float64)
    return m, (pred, label, states)


def written_then_saved(m):  # loaded: every version counter 0 again, the attributes as saved
    m.lambdas[5] = -0.5
    return saved_and_loaded(m), (pred, label, states)


def loaded_then_written_once(m):
    m = saved_and_loaded(m)
    m.lambdas[5] = -0.5
    return m, (pred, label, states)


for case in (half, written_then_moved, assigned, written_then_saved, loaded_then_written_once):
    module, inputs = case(fresh())
    try:
        module(*inputs)
    except torch.jit.Error as e:
        print(case.__name__, "refused:", str(e).strip().splitlines()[-1])
    else:
        print(case.__name__, "accepted")
"""


@pytest.mark.parametrize("gpu_logic", [False, True], ids=["cpu_logic", "gpu_logic"])
def test_a_scripted_module_refuses_lambdas_changed_by_conversion_assignment_moves_and_files(gpu_logic, tmp_path):
    # Off the CPU the scripted module reads λ back only when the buffer may have changed. TorchScript
    # has no data pointer, and a converted, moved, assigned or loaded buffer is a new tensor whose
    # version counter is 0 again; each of these ways to an invalid λ must still be refused. A fresh
    # process, since TorchScript caches what it compiled for RNNLoss (and a file, since it compiles
    # from source).
    import subprocess
    import sys
    from pathlib import Path
    script = tmp_path / "changed_scripted.py"
    script.write_text(_CHANGED_SCRIPTED.format(tests=str(Path(__file__).parent), gpu_logic=gpu_logic))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    negative = "builtins.ValueError: lambdas[5] ('fr_sd') must be finite and >= 0; it was set to a negative value"
    assert out.stdout.splitlines() == [
        "half refused: builtins.ValueError: lambdas must be a float64 tensor of shape [7], got dtype torch.float16 "
        "and shape [7]",
        "written_then_moved refused: " + negative,
        "assigned refused: builtins.ValueError: lambdas[5] ('fr_sd') must be finite and >= 0; it was set to NaN",
        "written_then_saved refused: " + negative,
        "loaded_then_written_once refused: " + negative,
    ], out.stdout

def test_a_replaced_float32_buffer_is_refused_and_a_float32_state_dict_loads_as_float64(model):
    loss = RNNLoss(model, lambda_fr=0.01)
    pred = torch.zeros(2, 2, 2)
    states = torch.rand(2, 2, model.n_hid)
    loss.lambdas = torch.tensor([1.0, 0, 0, 0, 0.01, 0, 0])  # float32 by default
    with pytest.raises(ValueError, match=r"lambdas must be a float64 tensor of shape \[7\], got dtype torch.float32"):
        loss(pred, pred, states)
    loss = RNNLoss(model, lambda_fr=0.01)
    loss.load_state_dict({k: (v.float() if k == "lambdas" else v) for k, v in loss.state_dict().items()}, assign=True)
    assert loss.lambdas.dtype == torch.float64
