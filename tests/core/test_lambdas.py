"""The λ rules: λ are checked where they are written (constructor, set_lambda, load_state_dict), in words that
read the same in every runtime; forward checks the buffer's dtype and shape always, its values on the CPU in
every call, and off the CPU only with a device-side assertion (a scripted module gives NaN there instead), with
no host–device synchronisation."""
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cases import ALL_ON, CUDA, child_env, make_inputs, make_model, script_roundtrip
from rnnloss import RNNLoss

SCRIPTED = pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
FLOAT32_MAX = (2.0 - 2.0 ** -23) * 2.0 ** 127  # written out: the largest float32
PROBLEMS = {"negative": (-0.1, "a negative value"), "minus_inf": (-math.inf, "a negative value"),
            "nan": (math.nan, "NaN"), "inf": (math.inf, "a value beyond float32's range"),
            "beyond_float32": (3.4028236e38, "a value beyond float32's range")}


@pytest.mark.parametrize("case", list(PROBLEMS))
def test_the_constructor_refuses_a_lambda_no_float32_lambda_may_have_in_words(model, case):
    value, words = PROBLEMS[case]
    with pytest.raises(ValueError) as err:
        RNNLoss(model, lambda_hid=value)
    assert str(err.value) == f"lambda_hid must be finite in float32 and >= 0, got {words}"


def test_the_largest_float32_is_a_valid_lambda(model):
    assert RNNLoss(model, lambda_fr=FLOAT32_MAX).lambdas[4].item() == FLOAT32_MAX
    assert RNNLoss(model, lambda_fr=10 ** 38).lambdas[4].item() == 1e38  # an int


@pytest.mark.parametrize("value, given", [("0.1", "str"), (None, "NoneType"), (True, "a bool"),
                                          (torch.tensor(0.1), "Tensor"), (np.float32(0.1), "float32")],
                         ids=["str", "None", "bool", "tensor", "numpy_float32"])
def test_the_constructor_refuses_a_lambda_that_is_not_an_int_or_a_float(model, value, given):
    with pytest.raises(TypeError) as err:
        RNNLoss(model, lambda_fr=value)
    assert str(err.value) == f"lambda_fr must be a real number (int or float), got {given}"


def _loss(scripted, **lambdas):
    loss = RNNLoss(make_model(), **(lambdas or dict(lambda_fr=0.1)))
    return (script_roundtrip(loss), torch.jit.Error) if scripted else (loss, None)


def _raises(scripted_error, eager_error):
    return pytest.raises(scripted_error or eager_error)


@SCRIPTED
@pytest.mark.parametrize("case", list(PROBLEMS))
def test_set_lambda_refuses_a_bad_value_in_words_and_keeps_the_old_one(scripted, case):
    loss, jit_error = _loss(scripted)
    value, words = PROBLEMS[case]
    with _raises(jit_error, ValueError) as err:
        loss.set_lambda("fr", value)
    assert f"lambda_fr must be finite in float32 and >= 0, got {words}" in str(err.value)
    assert loss.lambdas[4].item() == 0.1


@SCRIPTED
def test_set_lambda_lists_the_names_for_an_unknown_one(scripted):
    loss, jit_error = _loss(scripted)
    with _raises(jit_error, ValueError) as err:
        loss.set_lambda("lambda_fr", 1.0)
    assert "set_lambda: name must be one of mse, in, hid, out, fr, fr_sd, fr_cv, got 'lambda_fr'" in str(err.value)


@SCRIPTED
def test_set_lambda_refuses_a_non_zero_lambda_for_an_inactive_component_and_accepts_zero(scripted):
    loss, jit_error = _loss(scripted)
    with _raises(jit_error, ValueError) as err:
        loss.set_lambda("in", 0.3)
    assert ("lambda_in is non-zero but component 'in' is inactive (its lambda was 0 at construction); "
            "build the loss with a non-zero lambda_in") in str(err.value)
    loss.set_lambda("in", 0.0)
    loss.set_lambda("in", 0)
    assert loss.lambdas[1].item() == 0.0


@SCRIPTED
def test_set_lambda_takes_ints_and_floats_exactly_and_refuses_a_bool(scripted):
    loss, jit_error = _loss(scripted)
    loss.set_lambda("fr", 2)
    assert loss.lambdas[4].item() == 2.0
    loss.set_lambda("fr", 0.1)  # not a float32 number: stored as the float64 0.1, not via float32
    assert loss.lambdas[4].item() == 0.1
    loss.set_lambda("fr", FLOAT32_MAX)
    assert loss.lambdas[4].item() == FLOAT32_MAX
    with _raises(jit_error, TypeError) as err:
        loss.set_lambda("fr", True)
    assert "set_lambda value must be a real number (int or float), got a bool" in str(err.value)
    assert loss.lambdas[4].item() == FLOAT32_MAX


@SCRIPTED
def test_set_lambda_refuses_other_number_types_as_torchscripts_argument_parser_does(scripted):
    loss, _ = _loss(scripted)
    with pytest.raises((TypeError, RuntimeError)) as err:
        loss.set_lambda("fr", np.float32(0.5))
    if not scripted:
        assert type(err.value) is TypeError
        assert str(err.value) == "set_lambda value must be a real number (int or float), got float32"
    assert loss.lambdas[4].item() == 0.1


def test_set_lambda_through_the_train_module_reaches_the_loss():
    from rnnloss.trainer import CTRNNTrainer
    train = script_roundtrip(CTRNNTrainer(RNNLoss(make_model(), lambda_fr=0.1)))
    train.set_lambda("fr", 0.3)
    assert train.loss.lambdas[4].item() == 0.3
    with pytest.raises(torch.jit.Error, match="lambda_fr must be finite in float32 and >= 0, got NaN"):
        train.set_lambda("fr", math.nan)


# ---- load_state_dict

def test_load_state_dict_refuses_a_non_zero_lambda_for_an_inactive_component(model):
    trained = RNNLoss(model, lambda_fr=0.3)
    target = RNNLoss(model)  # fr inactive
    with pytest.raises(ValueError) as err:
        target.load_state_dict(trained.state_dict())
    assert str(err.value) == ("state_dict's lambdas[4] ('fr') is non-zero but component 'fr' is inactive (its lambda "
                              "was 0 at construction); build the loss with a non-zero lambda_fr")
    RNNLoss(model, lambda_fr=0.01).load_state_dict(trained.state_dict())  # active: loads


def test_load_state_dict_refuses_a_negative_lambda(model):
    loss = RNNLoss(model, lambda_fr=0.3)
    state = loss.state_dict()
    state["lambdas"] = state["lambdas"].clone()
    state["lambdas"][4] = -1.0
    with pytest.raises(ValueError, match=r"state_dict's lambdas\[4\] \('fr'\) must be finite in float32 and >= 0, "
                                         r"got a negative value"):
        loss.load_state_dict(state)
    assert loss.lambdas[4].item() == 0.3


def test_a_scripted_module_given_an_inactive_lambda_by_load_state_dict_refuses_it_at_the_next_forward():
    # A scripted module has no load_state_dict hook: the CPU check of every forward refuses the buffer.
    model = make_model()
    scripted = script_roundtrip(RNNLoss(model, lambda_fr=0.1))
    scripted.load_state_dict(RNNLoss(model, lambda_fr=0.1, lambda_in=0.2).state_dict())
    with pytest.raises(torch.jit.Error, match=r"lambdas\[1\] \('in'\) is non-zero but component 'in' is inactive"):
        scripted(*make_inputs(model))


def test_a_float32_state_dict_loads_as_float64(model):
    loss = RNNLoss(model, lambda_fr=0.01)
    loss.load_state_dict({k: (v.float() if k == "lambdas" else v) for k, v in loss.state_dict().items()}, assign=True)
    assert loss.lambdas.dtype == torch.float64


# ---- forward: the buffer's dtype and shape always, its values on the CPU in every call

WRITES = {
    "negative": (4, -1.0, "lambdas[4] ('fr') must be finite in float32 and >= 0, got a negative value"),
    "nan": (5, math.nan, "lambdas[5] ('fr_sd') must be finite in float32 and >= 0, got NaN"),
    "inf": (0, math.inf, "lambdas[0] ('mse') must be finite in float32 and >= 0, got a value beyond float32's range"),
    "beyond_float32": (6, 1e39, "got a value beyond float32's range"),
    "inactive": (1, 0.3, "lambdas[1] ('in') is non-zero but component 'in' is inactive (its lambda was 0 at "
                         "construction); build the loss with a non-zero lambda_in"),
}


@SCRIPTED
@pytest.mark.parametrize("how", ["indexing", "data", "numpy"])
@pytest.mark.parametrize("case", list(WRITES))
def test_forward_on_the_cpu_refuses_a_bad_value_written_into_the_buffer_in_every_call(case, how, scripted):
    index, value, message = WRITES[case]
    model = make_model()
    inputs = make_inputs(model)
    loss = RNNLoss(model, lambda_mse=1.0, lambda_fr=0.1, lambda_fr_sd=0.1, lambda_fr_cv=0.1)
    if scripted:
        loss = script_roundtrip(loss)
    loss(*inputs)
    with torch.no_grad():
        {"indexing": lambda: loss.lambdas.__setitem__(index, value),
         "data": lambda: loss.lambdas.data.__setitem__(index, value),
         "numpy": lambda: loss.lambdas.numpy().__setitem__(index, value)}[how]()
    for _ in range(3):
        with pytest.raises(torch.jit.Error if scripted else ValueError) as err:
            loss(*inputs)
        assert message in str(err.value)
    with torch.no_grad():  # a valid value written back is accepted again
        loss.lambdas[index] = 0.0 if case == "inactive" else 0.5
    loss(*inputs)


def _assigned(m):
    m.lambdas = torch.tensor([1.0, 1e-3, 1e-3, 1e-3, 1e-2, math.nan, 1e-2], dtype=torch.float64)
    return m


def _written_then_saved(m):
    m.lambdas[5] = math.nan
    return script_roundtrip(m)  # loaded back: the buffer as saved


def _written_then_moved(m):
    m.lambdas[5] = math.nan
    return m._apply(lambda t: t.clone())  # as a move: new tensors


@pytest.mark.parametrize("how", [_assigned, _written_then_saved, _written_then_moved], ids=lambda f: f.__name__[1:])
def test_a_scripted_module_refuses_a_bad_buffer_however_it_got_there(how):
    # No version counters or pointer bookkeeping: the values are read in every call on the CPU, so a replaced,
    # saved and loaded, or moved buffer is refused like any other.
    model = make_model()
    inputs = make_inputs(model)
    scripted = script_roundtrip(RNNLoss(model, **ALL_ON))
    scripted(*inputs)
    changed = how(scripted)
    with pytest.raises(torch.jit.Error, match=r"lambdas\[5\] \('fr_sd'\) must be finite in float32 and >= 0, got NaN"):
        changed(*inputs)


@pytest.mark.parametrize("device", ["cpu", "meta"], ids=["on_the_cpu", "off_the_cpu_on_meta"])
@pytest.mark.parametrize("buffer", ["float32", "shape_6"])
def test_forward_refuses_a_replaced_buffer_of_another_dtype_or_shape_on_any_device(buffer, device):
    model = make_model().to(device)
    loss = RNNLoss(model, lambda_fr=0.01)
    loss.lambdas = {"float32": torch.tensor([1.0, 0, 0, 0, 0.01, 0, 0]),
                    "shape_6": torch.zeros(6, dtype=torch.float64)}[buffer].to(device)
    with pytest.raises(ValueError, match=r"lambdas must be a float64 tensor of shape \[7\], got dtype "):
        loss(*make_inputs(model, device=device))


def test_a_scripted_module_converted_to_half_refuses_its_float16_buffer():
    scripted = script_roundtrip(RNNLoss(make_model(), **ALL_ON)).half()
    with pytest.raises(torch.jit.Error, match=r"lambdas must be a float64 tensor of shape \[7\], got dtype "
                                              r"torch.float16 and shape \[7\]"):
        scripted(*make_inputs(make_model(), dtype=torch.float16))


@SCRIPTED
def test_off_the_cpu_forward_reads_no_lambda_value(scripted):
    # On the meta device (no values at all) every check that would read λ back fails; the forward must pass on
    # shapes alone, as it runs without a host–device synchronisation on a GPU.
    model = make_model()
    loss = RNNLoss(model, **ALL_ON).to("meta")
    if scripted:  # (a scripted module cannot be moved to meta; one scripted there is used as it is)
        loss = torch.jit.script(loss)
    total, comps = loss(*make_inputs(model, device="meta"))
    assert total.is_meta and total.shape == () and comps.shape == (7,)


@pytest.mark.parametrize("convert", ["float", "half", "double", "bfloat16"])
def test_lambdas_stay_float64_and_exact_under_dtype_conversion(model, convert):
    loss = getattr(RNNLoss(model, lambda_fr=0.01), convert)()
    assert loss.lambdas.dtype == torch.float64 and loss.lambdas[4].item() == 0.01


def test_a_loss_built_on_a_meta_model_keeps_real_lambdas_and_materialises():
    real = RNNLoss(make_model(), **ALL_ON)
    loss = RNNLoss(make_model().to("meta"), **ALL_ON)
    assert loss.lambdas.device.type == "cpu"
    torch.testing.assert_close(loss.lambdas, real.lambdas, rtol=0, atol=0)
    loss.to_empty(device="cpu")
    torch.testing.assert_close(loss.lambdas, real.lambdas, rtol=0, atol=0)
    loss.load_state_dict(real.state_dict())
    pred, label, states = make_inputs(real.model, 4, 3)
    torch.testing.assert_close(loss(pred, label, states)[1], real(pred, label, states)[1], rtol=0, atol=0)


def test_a_loss_moved_to_meta_materialises_with_lambdas_that_forward_refuses_until_loaded():
    # .to("meta") drops every value; to_empty() must not fail on the λ buffer, and the uninitialised λ must never
    # be used: NaN until a state is loaded.
    real = RNNLoss(make_model(), **ALL_ON)
    loss = RNNLoss(make_model(), **ALL_ON).to("meta")
    loss.to_empty(device="cpu")
    assert loss.lambdas.dtype == torch.float64 and loss.lambdas.device.type == "cpu"
    pred, label, states = make_inputs(real.model, 4, 3)
    with pytest.raises(ValueError, match=r"lambdas\[0\] \('mse'\) must be finite in float32 and >= 0, got NaN"):
        loss(pred, label, states)
    loss.load_state_dict(real.state_dict())
    torch.testing.assert_close(loss(pred, label, states)[1], real(pred, label, states)[1], rtol=0, atol=0)


def test_a_loss_built_in_inference_mode_and_a_functional_call_on_the_lambdas_work():
    model = make_model()
    pred, label, states = make_inputs(model)
    with torch.inference_mode():
        loss = RNNLoss(model, **ALL_ON)
        total = loss(pred, label, states)[0]
    reference = RNNLoss(model, **ALL_ON)
    assert total.item() == reference(pred, label, states)[0].item()
    params = {"lambdas": reference.lambdas.clone()}
    grad = torch.func.grad(lambda b: torch.func.functional_call(reference, b, (pred, label, states))[0])(params)
    # d total / d λ_i is component i / λ_i (0 for an inactive component).
    want = reference(pred, label, states)[1].double() / reference.lambdas
    torch.testing.assert_close(grad["lambdas"], want, rtol=1e-6, atol=0)


# ---- on a GPU: a device-side assertion (eager), NaN (scripted), no synchronisation. A device-side assertion
# poisons the process's CUDA context, so each case runs in a fresh interpreter.

_ON_CUDA = textwrap.dedent("""
    import math, sys, torch
    sys.path.insert(0, {tests!r})
    from cases import ALL_ON, make_inputs, make_model, script_roundtrip
    from rnnloss import RNNLoss
    model = make_model().cuda()
    loss = RNNLoss(model, **ALL_ON)
    if {scripted!r}:
        loss = script_roundtrip(loss)
    inputs = make_inputs(model, device="cuda")
    torch.cuda.set_sync_debug_mode("error")  # any host–device synchronisation in forward raises
    for _ in range(3):
        loss(*inputs)
    torch.cuda.set_sync_debug_mode("default")
    print("no synchronisation", flush=True)
    with torch.no_grad():
        loss.lambdas[4] = -1.0
    try:
        total = loss(*inputs)[0]
        print("total", total.item(), flush=True)
    except RuntimeError as e:
        print("raised", " ".join(str(e).split())[:200], flush=True)
""")


@pytest.mark.cuda
@CUDA
@SCRIPTED
def test_off_the_cpu_a_bad_lambda_fails_on_the_device_without_a_synchronisation(scripted, tmp_path):
    from cases import TESTS
    script = tmp_path / "on_cuda.py"
    script.write_text(_ON_CUDA.format(tests=str(TESTS), scripted=scripted))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=child_env())
    lines = out.stdout.splitlines()
    assert lines[:1] == ["no synchronisation"], out.stdout + out.stderr[-2000:]
    if scripted:  # TorchScript drops device-side assertions: the value becomes NaN
        assert out.returncode == 0 and lines[1:] == ["total nan"], out.stdout + out.stderr[-2000:]
    else:  # the assertion fires on the device and surfaces at the next synchronisation (.item()), or ends the process
        assert lines[1:2] != ["total nan"] and (lines[1:2] and lines[1].startswith("raised") or out.returncode != 0), \
            out.stdout + out.stderr[-2000:]
