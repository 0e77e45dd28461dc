"""One walk through the whole rules table (rnnloss.rules.Rule), every rule through every Python-side runtime
that enforces it (the C++ side: tests/cpp). The messages below are written out, not taken from the table:

- eager and TorchScript (a saved and loaded module) raise the full message, the same text, the exception type
  of the table (TorchScript as torch.jit.Error);
- the exported graphs (the .pt2 through ``.module()``, ONNX Runtime) raise the text before ``, got`` (they
  cannot format run-time values): the .pt2 as the assertion's message, ONNX Runtime with the ScatterND node
  named after it.
"""
import numpy as np
import pytest
import torch

from cases import ALL_ON, make_model, script_roundtrip
from rnnloss import CTRNN, RNNLoss
from rnnloss.rules import TYPE_ERRORS, Rule, where
from runtime_exports import export_to

T, B, N_OUT, N_HID = 5, 3, 2, 8
CONFIG = {"model": {"dims": [3, N_HID, N_OUT]}, "loss": {"lambda_mse": 1.0, "lambda_in": 0.3, "lambda_fr": 0.1,
                                                         "lambda_fr_sd": 0.1}, "example": {"time": 6, "batch": 3},
          "mask": True}


def inputs(pred=(T, B, N_OUT), label=None, states=(T, B, N_HID), mask=None):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(*pred, generator=g), torch.randn(*(label or pred), generator=g),
            torch.rand(*states, generator=g), torch.rand(*(mask or pred), generator=g))


def bad_weights():
    p, l, s, m = inputs()
    m[1, 1, 1] = -0.5
    return p, l, s, m


# rule: (pred, label, states, mask; the eager message; the graphs' message). ONNX Runtime checks an input's rank
# and static axes against the graph's declarations before running any node: there the text is its own.
ORT_OWN = {Rule.STATES_LAST_DIM: "Got invalid dimensions for input: states",
           Rule.GRAPH_SHAPE: "Got invalid dimensions for input: pred"}
FORWARD = {
    Rule.EMPTY: (inputs((0, B, N_OUT)), "pred must not be empty, got shape [0, 3, 2]", "pred must not be empty"),
    Rule.LABEL_SHAPE: (inputs(label=(T, 1, N_OUT)), "pred and label must have the same shape, got pred [5, 3, 2] and "
                       "label [5, 1, 2]", "pred and label must have the same shape"),
    Rule.STATES_LAST_DIM: (inputs(states=(T, B, N_HID - 1)), "states must have N_hid=8 as its last dimension, got "
                           "shape [5, 3, 7]", "states must have"),
    Rule.MASK_SHAPE: (inputs(mask=(T, B + 1, N_OUT)), "mask must have pred's shape [5, 3, 2] or pred's shape without "
                      "its last axis [5, 3], got shape [5, 4, 2]", "mask must have pred's shape"),
    Rule.MASK_WEIGHTS: (bad_weights(), "mask must hold finite weights >= 0", "mask must hold finite weights >= 0"),
    Rule.GRAPH_SHAPE: (inputs(pred=(T, B, N_OUT + 1), label=(T, B, N_OUT + 1), mask=(T, B, N_OUT + 1)), None,
                       "pred must have shape"),
}


def loss_and_model():
    model = make_model((3, N_HID, N_OUT))
    return RNNLoss(model, **{**ALL_ON, "lambda_hid": 0.0}), model


# Rules of eager and TorchScript outside the graphs: (call on (loss, model), the message). A module argument is
# eager or scripted alike.
p, l, s, m = inputs()
OTHER = {
    Rule.UNKNOWN_KEYWORD: (lambda loss, model: RNNLoss(model, lamda_fr=1.0), "RNNLoss got an unexpected keyword "
                           "argument 'lamda_fr' (did you mean 'lambda_fr'?); valid keywords are"),
    Rule.MODEL_TYPE: (lambda loss, model: RNNLoss(torch.nn.Linear(2, 2)), "model must be a CTRNN (or a subclass), got "
                      "Linear"),
    Rule.LAMBDA_TYPE: (lambda loss, model: loss.set_lambda("fr", True), "set_lambda value must be a real number (int or "
                       "float), got a bool"),
    Rule.LAMBDA_VALUE: (lambda loss, model: loss.set_lambda("fr", -1.0), "lambda_fr must be finite in float32 and >= 0, "
                        "got a negative value"),
    Rule.LAMBDA_INACTIVE: (lambda loss, model: loss.set_lambda("hid", 0.5), "lambda_hid is non-zero but component 'hid' "
                           "is inactive (its lambda was 0 at construction); build the loss with a non-zero lambda_hid"),
    Rule.LAMBDA_NAME: (lambda loss, model: loss.set_lambda("rate", 0.5), "set_lambda: name must be one of mse, in, hid, "
                       "out, fr, fr_sd, fr_cv, got 'rate'"),
    Rule.LAMBDAS_BUFFER: (lambda loss, model: (loss.lambdas.resize_(6), loss(p, l, s)), "lambdas must be a float64 "
                          "tensor of shape [7], got dtype torch.float64 and shape [6]"),
    Rule.LAMBDAS_VALUES: (None, None),  # off the CPU only: tests/runtimes/test_cuda.py
    Rule.SYNC_EAGER_ONLY: (lambda loss, model: torch.jit.script(RNNLoss(model, sync_stats=True)),
                           "RNNLoss(sync_stats=True) runs eagerly only"),
    Rule.SYNC_NO_GROUP: (lambda loss, model: RNNLoss(model, lambda_fr=0.1, sync_stats=True)(p, l, s),
                         "RNNLoss(sync_stats=True) needs torch.distributed initialised: call "
                         "torch.distributed.init_process_group before the first forward"),
    Rule.NOT_FLOAT: (lambda loss, model: loss(p.int(), l, s), "pred must be a floating-point tensor (float16, "
                     "bfloat16, float32 or float64), got dtype torch.int32"),
    Rule.DEVICE: (lambda loss, model: loss(p, l.to("meta"), s), "label must be on the device of pred (cpu), got meta"),
    Rule.STATES_MISSING: (lambda loss, model: loss(p, l, None), "states is required when lambda_fr, lambda_fr_sd or "
                          "lambda_fr_cv > 0, got None"),
    Rule.MASK_DTYPE: (lambda loss, model: loss(p, l, s, m.to(torch.complex64)), "mask must be a real tensor (floating "
                      "point, integer or bool), got dtype torch.complex64"),
    Rule.X_SHAPE: (lambda loss, model: model(torch.randn(4, 2)), "x must have shape (T, B, N_in) with N_in=3, got "
                   "shape [4, 2]"),
    Rule.X_DTYPE: (lambda loss, model: model(torch.randn(4, 2, 3).double()), "x must have the model's dtype "
                   "torch.float32, got dtype torch.float64"),
    Rule.INIT_STATE_SHAPE: (lambda loss, model: model(torch.randn(4, 2, 3), torch.zeros(2, 7)), "init_state must have "
                            "shape [B, N_hid] = [2, 8], got shape [2, 7]"),
    Rule.DIMS: (lambda loss, model: CTRNN((3, 0, 2)), "dims must be a sequence (N_in, N_hid, N_out) of three positive "
                "ints, got (3, 0, 2)"),
    Rule.POSITIVE: (lambda loss, model: CTRNN((3, 8, 2), tau=0.0), "tau must be a finite number > 0, got 0.0"),
    Rule.NON_NEGATIVE: (lambda loss, model: CTRNN((3, 8, 2), preact_noise=-1.0), "preact_noise must be a finite "
                        "number >= 0, got -1.0"),
    Rule.DT_ABOVE_TAU: (lambda loss, model: CTRNN((3, 8, 2), dt=200.0), "dt must not exceed tau (alpha = dt / tau "
                        "must be <= 1), got dt=200.0, tau=100.0"),
    Rule.CHOICE: (lambda loss, model: CTRNN((3, 8, 2), activation="gelu"), "activation must be one of ['relu', "
                  "'tanh', 'sigmoid', 'softplus', 'retanh'], got 'gelu'"),
    Rule.PER_LAYER: (lambda loss, model: CTRNN((3, 8, 2), weights=("zero", "zero")), "weights must be one value or a "
                     "sequence of three (input, hidden, readout), got ('zero', 'zero')"),
    Rule.LAYER_CHOICE: (lambda loss, model: CTRNN((3, 8, 2), weights="xavier"), "weights for the input layer must be "
                        "one of ['uniform', 'normal', 'zero'] or a tensor, got 'xavier'"),
    Rule.LAYER_SHAPE: (lambda loss, model: CTRNN((3, 8, 2), sparsity_masks=(None, torch.ones(8, 7), None)),
                       "sparsity_masks for the hidden layer must have shape [8, 8], got [8, 7]"),
    Rule.LAYER_FINITE: (lambda loss, model: CTRNN((3, 8, 2), sparsity_masks=(torch.full((8, 3), np.inf), None, None)),
                        "sparsity_masks for the input layer must be finite"),
    Rule.EI_VALUES: (lambda loss, model: CTRNN((3, 8, 2), ei_masks=(None, torch.full((8,), 2.0), None)),
                     "ei_masks for the hidden layer must hold only +1, -1 and 0"),
    Rule.PLASTICITY_VALUES: (lambda loss, model: CTRNN((3, 8, 2), plasticity_masks=(-torch.ones(8, 3), None, None)),
                             "plasticity_masks for the input layer must be >= 0 (gradient scales)"),
}


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rules")
    loss, _ = export_to(folder, CONFIG, {"rnn_loss.onnx", "rnn_loss.pt", "rnn_loss.pt2"})
    import onnxruntime as ort
    session = ort.InferenceSession(str(folder / "rnn_loss.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return {"E": loss, "S": torch.jit.load(str(folder / "rnn_loss.pt")),
            "pt2": torch.export.load(str(folder / "rnn_loss.pt2")).module(),
            "onnxruntime": lambda *xs: session.run(None, dict(zip(names, (x.numpy() for x in xs))))}


def test_every_rule_of_the_table_has_a_case_here():
    assert set(FORWARD) | set(OTHER) == set(Rule)


@pytest.mark.parametrize("rule", list(FORWARD), ids=lambda r: r.name)
def test_forward_rules_in_eager_torchscript_pt2_and_onnx_runtime(graphs, rule):
    args, full, graph_text = FORWARD[rule]
    expected = TypeError if rule in TYPE_ERRORS else ValueError
    for runtime in "ES":
        if runtime in where(rule):
            with pytest.raises(expected if runtime == "E" else torch.jit.Error) as err:
                graphs[runtime](*args)
            assert full in str(err.value), (runtime, str(err.value))
    for runtime, shown in (("pt2", graph_text), ("onnxruntime", ORT_OWN.get(rule, f"Name:'{graph_text}"))):
        with pytest.raises(Exception) as err:
            with torch.no_grad():
                graphs[runtime](*args)
        assert shown in str(err.value), (runtime, str(err.value))


@pytest.mark.parametrize("rule", [r for r in OTHER if OTHER[r][0] is not None], ids=lambda r: r.name)
def test_other_rules_give_one_text_in_eager_and_torchscript(rule, tmp_path):
    call, message = OTHER[rule]
    expected = TypeError if rule in TYPE_ERRORS else ValueError
    runtimes = [r for r in "ES" if r in where(rule)] or ["E"]
    if rule is Rule.SYNC_EAGER_ONLY:
        runtimes = ["E"]  # refused by torch.jit.script itself, before any TorchScript
    for runtime in runtimes:
        loss, model = loss_and_model()
        if runtime == "S":
            loss, model = script_roundtrip(loss, tmp_path, "loss.pt"), script_roundtrip(model, tmp_path, "model.pt")
        with pytest.raises(expected if runtime == "E" else torch.jit.Error) as err:
            call(loss, model)
        assert message in str(err.value), (runtime, str(err.value))
