"""Every exported loss graph refuses at run time what eager refuses and the graph can see — never a
number — and accepts or refuses the inputs its documented specialisations say (docs: artifacts).

One small export (all components on), three runtimes: TorchScript (rnn_loss.pt), torch.export
(rnn_loss.pt2, through ``.module()``) and ONNX Runtime's CPU provider (rnn_loss.onnx)."""
import math
import re

import numpy as np
import onnxruntime as ort
import pytest
import torch

from rnnloss import export
from rnnloss.config import validate

T, B, N_OUT, N_HID = 5, 4, 2, 16
CONFIG = {"model": {"dims": [3, N_HID, N_OUT]}, "example": {"time": 6, "batch": 3}}


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("graphs")
    config = validate(CONFIG)
    loss = export.build(config)
    example = export.sample_inputs(loss, 6, 3, seed=0)
    export.export_torchscript(loss, folder / export.LOSS_PT)
    export.export_pt2(loss, example, folder / export.LOSS_PT2)
    export.export_onnx(loss, example, folder / export.LOSS_ONNX, opset=None)
    session = ort.InferenceSession(str(folder / export.LOSS_ONNX), providers=["CPUExecutionProvider"])
    return {
        "eager": loss,
        "torchscript": torch.jit.load(str(folder / export.LOSS_PT)),
        "pt2": torch.export.load(str(folder / export.LOSS_PT2)).module(),
        "onnxruntime": lambda *xs: [torch.from_numpy(a) for a in session.run(
            None, {name: x.numpy() for name, x in zip(export.INPUT_NAMES, xs)})],
    }


def shapes(pred=(T, B, N_OUT), label=(T, B, N_OUT), states=(T, B, N_HID)):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.rand(*s, generator=g) for s in (pred, label, states))


# case: (inputs, the error each runtime raises: a pattern of its message)
REFUSED = {
    "label_broadcast_over_batch": (shapes(label=(T, 1, N_OUT)), {
        "torchscript": "pred and label must have the same shape, got pred \\[5, 4, 2\\] and label \\[5, 1, 2\\]",
        "pt2": re.escape("Guard failed: label.size()[1] == pred.size()[1]"),
        "onnxruntime": "Name:'pred and label must have the same shape'"}),
    "label_broadcast_over_time": (shapes(label=(1, B, N_OUT)), {
        "torchscript": "pred and label must have the same shape",
        "pt2": re.escape("Guard failed: label.size()[0] == pred.size()[0]"),
        "onnxruntime": "Name:'pred and label must have the same shape'"}),
    "label_longer": (shapes(label=(T + 1, B, N_OUT)), {
        "torchscript": "pred and label must have the same shape",
        "pt2": re.escape("Guard failed: label.size()[0] == pred.size()[0]"),
        "onnxruntime": "Name:'pred and label must have the same shape'"}),
    "empty_time": (shapes((0, B, N_OUT), (0, B, N_OUT), (0, B, N_HID)), {
        "torchscript": "pred must not be empty, got shape \\[0, 4, 2\\]",
        "pt2": "pred must not be empty",
        "onnxruntime": "Name:'(pred|states) must not be empty'"}),
    "empty_batch": (shapes((T, 0, N_OUT), (T, 0, N_OUT), (T, 0, N_HID)), {
        "torchscript": "pred must not be empty, got shape \\[5, 0, 2\\]",
        "pt2": "pred must not be empty",
        "onnxruntime": "Name:'(pred|states) must not be empty'"}),
    "states_wrong_hidden_size": (shapes(states=(T, B, N_HID - 1)), {
        "torchscript": "states must have N_hid=16 as its last dimension, got shape \\[5, 4, 15\\]",
        "pt2": re.escape("Guard failed: states.size()[2] == 16"),
        "onnxruntime": "Got invalid dimensions for input: states"}),
}


@pytest.mark.parametrize("runtime", ["torchscript", "pt2", "onnxruntime"])
@pytest.mark.parametrize("case", list(REFUSED))
def test_exported_graph_refuses_what_eager_refuses(graphs, case, runtime):
    inputs, messages = REFUSED[case]
    with pytest.raises(ValueError, match=messages["torchscript"]):
        graphs["eager"](*inputs)  # eager refuses it with the message TorchScript gives
    with pytest.raises(Exception, match=messages[runtime]):
        graphs[runtime](*inputs)


def test_onnx_refusals_leave_the_values_on_one_sample_unchanged(graphs):
    # (1, 1): the smallest valid input passes every check with the eager value.
    inputs = shapes((1, 1, N_OUT), (1, 1, N_OUT), (1, 1, N_HID))
    with torch.no_grad():
        ref = graphs["eager"](*inputs)[1].double()
    got = graphs["onnxruntime"](*inputs)[1].double()
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()  # other runtime: rnnloss.parity's bound


def test_specialisations_float64(graphs):
    inputs = tuple(x.double() for x in shapes())
    with torch.no_grad():
        ref = graphs["eager"](*inputs)[1]
        assert torch.allclose(graphs["torchscript"](*inputs)[1], ref, rtol=1e-12, atol=0)  # any float dtype
    with pytest.raises(Exception, match="Tensor dtype mismatch! Expected: Float, Got: double"):
        graphs["pt2"](*inputs)
    with pytest.raises(Exception, match=re.escape("Unexpected input data type. Actual: (tensor(double))")):
        graphs["onnxruntime"](*inputs)


def test_specialisations_states_with_other_samples_than_pred(graphs):
    # Eager reads every leading index of states as a sample, whatever pred's time and batch are.
    inputs = shapes(states=(T + 2, 1, N_HID))
    with torch.no_grad():
        ref = graphs["eager"](*inputs)[1].double()
        assert torch.allclose(graphs["torchscript"](*inputs)[1].double(), ref, rtol=1e-5, atol=0)
    # The exported graphs share one time and one batch symbol between the inputs (their counts
    # come from whichever input the exporter saw first), so both refuse rather than divide wrongly.
    with pytest.raises(Exception, match=re.escape("Guard failed: states.size()[0] == pred.size()[0]")):
        graphs["pt2"](*inputs)
    with pytest.raises(Exception, match="Name:'states must have pred's time and batch sizes in an exported graph'"):
        graphs["onnxruntime"](*inputs)


def test_onnx_refuses_bad_inputs_that_no_active_component_reads(tmp_path):
    # With only a weight penalty active the exported graph folds to constants and reads no input;
    # eager still refuses, and so must the graph (its outputs wait for every check).
    config = validate({**CONFIG, "loss": {"lambda_mse": 0, "lambda_in": 1, "lambda_hid": 0, "lambda_out": 0,
                                          "lambda_fr": 0, "lambda_fr_sd": 0, "lambda_fr_cv": 0}})
    loss = export.build(config)
    export.export_onnx(loss, export.sample_inputs(loss, 6, 3, seed=0), tmp_path / "in.onnx", opset=None)
    session = ort.InferenceSession(str(tmp_path / "in.onnx"), providers=["CPUExecutionProvider"])
    for case in ("label_broadcast_over_batch", "empty_time"):
        inputs = REFUSED[case][0]
        with pytest.raises(Exception, match=REFUSED[case][1]["onnxruntime"]):
            session.run(None, {name: x.numpy() for name, x in zip(export.INPUT_NAMES, inputs)})
    good = session.run(None, {name: x.numpy() for name, x in zip(export.INPUT_NAMES, shapes())})[1]
    with torch.no_grad():
        ref = loss(*shapes())[1].numpy()
    assert np.abs(good - ref).max() <= 1e-5 * np.abs(ref).max()  # folded by torch's own kernels


@pytest.fixture(scope="module")
def masked_graphs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("masked")
    loss = export.build(validate({**CONFIG, "mask": True}))
    example = export.sample_inputs(loss, 6, 3, seed=0, mask=True)
    export.export_pt2(loss, example, folder / export.LOSS_PT2)
    export.export_onnx(loss, example, folder / export.LOSS_ONNX, opset=None)
    session = ort.InferenceSession(str(folder / export.LOSS_ONNX), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(export.MASKED_INPUT_NAMES)
    return {
        "eager": loss,
        "torchscript": torch.jit.script(loss),
        "pt2": torch.export.load(str(folder / export.LOSS_PT2)).module(),
        "onnxruntime": lambda *xs: [torch.from_numpy(a) for a in session.run(
            None, {name: x.numpy() for name, x in zip(export.MASKED_INPUT_NAMES, xs)})],
    }


def with_mask(mask):
    return shapes() + (mask,)


def weights(value):
    w = torch.rand(T, B, N_OUT)
    w[2, 1, 0] = value
    return w


MASK_REFUSED = {
    "mask_longer": (with_mask(torch.rand(T + 1, B, N_OUT)), {
        "torchscript": re.escape("mask must have pred's shape [5, 4, 2] or pred's shape without its last axis [5, 4], "
                                 "got shape [6, 4, 2]"),
        "pt2": re.escape("Guard failed: mask.size()[0] == pred.size()[0]"),
        "onnxruntime": "Name:'mask must have pred's shape'"}),
    "mask_broadcast_over_batch": (with_mask(torch.rand(T, 1, N_OUT)), {
        "torchscript": "mask must have pred's shape",
        "pt2": re.escape("Guard failed: mask.size()[1] == pred.size()[1]"),
        "onnxruntime": "Name:'mask must have pred's shape'"}),
    **{f"mask_{name}": (with_mask(weights(value)), {
        "torchscript": "mask must hold finite weights >= 0",
        "pt2": "mask must hold finite weights >= 0",
        "onnxruntime": "Name:'mask must hold finite weights >= 0'"})
       for name, value in (("negative", -0.5), ("nan", math.nan), ("inf", math.inf))},
}


@pytest.mark.parametrize("runtime", ["torchscript", "pt2", "onnxruntime"])
@pytest.mark.parametrize("case", list(MASK_REFUSED))
def test_masked_graph_refuses_bad_masks(masked_graphs, case, runtime):
    inputs, messages = MASK_REFUSED[case]
    with pytest.raises(ValueError, match=messages["torchscript"]):
        masked_graphs["eager"](*inputs)
    with pytest.raises(Exception, match=messages[runtime]):
        masked_graphs[runtime](*inputs)


def test_masked_graph_specialisation_one_weight_per_sample(masked_graphs):
    # Eager takes a mask shaped like pred without its last axis; the masked graphs take pred's shape.
    inputs = with_mask(torch.rand(T, B))
    with torch.no_grad():
        masked_graphs["eager"](*inputs)
        masked_graphs["torchscript"](*inputs)
    with pytest.raises(IndexError, match="tuple index out of range"):  # from the .pt2's guard on mask.size()[2]
        masked_graphs["pt2"](*inputs)
    with pytest.raises(Exception, match="Invalid rank for input: mask"):
        masked_graphs["onnxruntime"](*inputs)
