"""Every documented misuse of the loss's and the model's constructor and forward raises a message naming the
argument, the expected and the given value — the same text from the eager and the scripted module, and the
exception type the rules table (rnnloss.rules) assigns."""
import pytest
import torch

from cases import ALL_ON, make_inputs, make_model, script_roundtrip
from rnnloss import CTRNN, RNNLoss
from rnnloss.rules import TYPE_ERRORS, Rule

SCRIPTED = pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])


def test_a_misspelled_lambda_is_a_type_error_suggesting_the_name_and_listing_the_valid_ones(model):
    with pytest.raises(TypeError) as err:
        RNNLoss(model, lamda_fr=0.1)
    msg = str(err.value)
    assert "'lamda_fr'" in msg and "did you mean 'lambda_fr'" in msg
    assert all(name in msg for name in ("lambda_mse", "lambda_in", "lambda_fr_cv"))


@pytest.mark.parametrize("model", [torch.nn.Linear(2, 2), None, "ctrnn"], ids=["Linear", "None", "str"])
def test_a_model_that_is_not_a_ctrnn_is_a_type_error(model):
    with pytest.raises(TypeError, match="model must be a CTRNN"):
        RNNLoss(model)


def test_a_ctrnn_subclass_is_accepted_and_scripts():
    class MyRNN(CTRNN):
        pass

    torch.jit.script(RNNLoss(MyRNN((1, 4, 1)), lambda_hid=1.0))


@pytest.mark.parametrize("kwargs, exc, message", [
    (dict(sync_stats=1), TypeError, "sync_stats must be a bool, got 1"),
    (dict(process_group=object()), ValueError, "process_group is only used with sync_stats=True"),
], ids=["sync_stats_int", "process_group_without_sync"])
def test_distributed_options_are_checked(model, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        RNNLoss(model, **kwargs)


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
    "pred_complex": (lambda p, l, s: (p.to(torch.complex64), l, s), TypeError,
                     "pred must be a floating-point tensor (float16, bfloat16, float32 or float64), got dtype "
                     "torch.complex64"),
    "pred_empty": (lambda p, l, s: (p[:0], l[:0], s), ValueError, "pred must not be empty, got shape [0, 3, 2]"),
    "states_empty": (lambda p, l, s: (p, l, s[:, :0]), ValueError, "states must not be empty, got shape [5, 0, 8]"),
    "label_other_device": (lambda p, l, s: (p, l.to("meta"), s), ValueError,
                           "label must be on the device of pred (cpu), got meta"),
    "states_other_device": (lambda p, l, s: (p, l, s.to("meta")), ValueError,
                            "states must be on the device of pred (cpu), got meta"),
    "pred_off_the_models_device": (lambda p, l, s: (p.to("meta"), l.to("meta"), s.to("meta")), ValueError,
                                   "pred must be on the device of the model (cpu), got meta"),
}


@SCRIPTED
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_raises_the_same_message_eager_and_scripted(case, scripted):
    make_args, exc, message = BAD_CALLS[case]
    model = make_model((3, 8, 2))
    pred, label, states = make_inputs(model)
    loss = RNNLoss(model, **ALL_ON)
    if scripted:
        loss = script_roundtrip(loss)
        exc = torch.jit.Error  # TorchScript re-raises as torch.jit.Error carrying the same text
    with pytest.raises(exc) as err:
        loss(*make_args(pred, label, states))
    assert message in str(err.value)


@SCRIPTED
@pytest.mark.parametrize("case", ["wrong_rank", "wrong_inputs", "int", "wrong_dtype", "init_state", "batch_first"])
def test_bad_model_input_raises_the_same_message_eager_and_scripted(case, scripted):
    model = make_model((3, 8, 2), batch_first=case == "batch_first")
    x = torch.randn(4, 2, 3)
    args, exc, message = {
        "wrong_rank": ((x[0],), ValueError, "x must have shape (T, B, N_in) with N_in=3, got shape [2, 3]"),
        "wrong_inputs": ((x[..., :2],), ValueError, "with N_in=3, got shape [4, 2, 2]"),
        "int": ((x.long(),), TypeError, "x must be a floating-point tensor"),
        "wrong_dtype": ((x.double(),), TypeError,
                        "x must have the model's dtype torch.float32, got dtype torch.float64"),
        "init_state": ((x, torch.zeros(2, 7)), ValueError,
                       "init_state must have shape [B, N_hid] = [2, 8], got shape [2, 7]"),
        "batch_first": ((x[..., :1],), ValueError, "x must have shape (B, T, N_in) with N_in=3, got shape [4, 2, 1]"),
    }[case]
    if scripted:
        model = script_roundtrip(model)
        exc = torch.jit.Error
    with pytest.raises(exc) as err:
        model(*args)
    assert message in str(err.value)


@pytest.mark.parametrize("kwargs, exc, message", [
    (dict(dims=(3, 0, 2)), ValueError, "dims must be a sequence (N_in, N_hid, N_out) of three positive ints"),
    (dict(dims=(3, 2)), ValueError, "dims must be"),
    (dict(dims=(3, 8.0, 2)), ValueError, "dims must be"),
    (dict(dims=(3, True, 2)), ValueError, "dims must be"),
    (dict(dims=5), TypeError, "dims must be a sequence"),
    (dict(dims=(3, 8, 2), tau=0.0), ValueError, "tau must be a finite number > 0, got 0.0"),
    (dict(dims=(3, 8, 2), dt=float("nan")), ValueError, "dt must be a finite number > 0, got nan"),
    (dict(dims=(3, 8, 2), dt=200.0), ValueError, "dt must not exceed tau (alpha = dt / tau must be <= 1), got "
                                                 "dt=200.0, tau=100.0"),
    (dict(dims=(3, 8, 2), activation="gelu"), ValueError, "activation must be one of"),
    (dict(dims=(3, 8, 2), init_state="keep"), ValueError, "init_state must be one of ['zero', 'learn'], got 'keep'"),
    (dict(dims=(3, 8, 2), preact_noise=-1.0), ValueError, "preact_noise must be a finite number >= 0"),
    (dict(dims=(3, 8, 2), batch_first=1), TypeError, "batch_first must be a bool"),
    (dict(dims=(3, 8, 2), weights="xavier"), ValueError, "weights for the input layer must be one of"),
    (dict(dims=(3, 8, 2), weights=("uniform", "zero")), TypeError,
     "weights must be one value or a sequence of three (input, hidden, readout)"),
    (dict(dims=(3, 8, 2), biases=(True, "ones", True)), ValueError, "biases for the hidden layer must be one of"),
    (dict(dims=(3, 8, 2), biases=(True, True, torch.zeros(3))), ValueError,
     "biases for the readout layer must have shape [2], got [3]"),
    (dict(dims=(3, 8, 2), weights=("uniform", torch.full((8, 8), float("inf")), "uniform")), ValueError,
     "weights for the hidden layer must be finite"),
    (dict(dims=(3, 8, 2), sparsity_masks=(None, torch.ones(8, 7), None)), ValueError,
     "sparsity_masks for the hidden layer must have shape [8, 8], got [8, 7]"),
    (dict(dims=(3, 8, 2), ei_masks=(None, torch.full((8,), 2.0), None)), ValueError,
     "ei_masks for the hidden layer must hold only +1, -1 and 0"),
    (dict(dims=(3, 8, 2), plasticity_masks=(None, -torch.ones(8, 8), None)), ValueError,
     "plasticity_masks for the hidden layer must be >= 0 (gradient scales)"),
])
def test_the_ctrnn_constructor_refuses_bad_arguments(kwargs, exc, message):
    dims = kwargs.pop("dims")
    with pytest.raises(exc) as err:
        CTRNN(dims, **kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("rule", [Rule.LABEL_SHAPE, Rule.NOT_FLOAT, Rule.MODEL_TYPE, Rule.MASK_DTYPE, Rule.X_DTYPE,
                                  Rule.LAMBDA_VALUE], ids=lambda r: r.name)
def test_each_rule_is_raised_with_the_exception_type_of_the_table(rule):
    model = make_model((3, 8, 2))
    pred, label, states = make_inputs(model)
    loss = RNNLoss(model, lambda_fr=0.1)
    call = {
        Rule.LABEL_SHAPE: lambda: loss(pred, label[:1], states),
        Rule.NOT_FLOAT: lambda: loss(pred.int(), label, states),
        Rule.MODEL_TYPE: lambda: RNNLoss(torch.nn.Linear(1, 1)),
        Rule.MASK_DTYPE: lambda: loss(pred, label, states, torch.ones(pred.shape, dtype=torch.complex64)),
        Rule.X_DTYPE: lambda: model(torch.randn(2, 2, 3, dtype=torch.float64)),
        Rule.LAMBDA_VALUE: lambda: loss.set_lambda("fr", -1.0),
    }[rule]
    expected = TypeError if rule in TYPE_ERRORS else ValueError
    with pytest.raises(Exception) as err:
        call()
    assert type(err.value) is expected
    assert str(err.value).startswith(rule.value.split("{}")[0])
