"""The optional mask weighting the task error: values, gradients, refusals (eager and scripted).

mse = λ_mse · Σ w·(pred − label)² / Σ w, with per-sample weights (pred's shape without its last
axis) counted once per output. References are NumPy float64 with math.fsum.
"""
import math

import numpy as np
import pytest
import torch

from conftest import ALL_ON, make_inputs, make_model, script_roundtrip
from rnnloss import RNNLoss


def weighted_mse_reference(pred, label, mask):
    p, y, w = (np.asarray(t.detach().double().numpy()) for t in (pred, label, mask))
    e2 = (p - y) ** 2
    if w.ndim < p.ndim:
        w = np.broadcast_to(w[..., None], p.shape)
    den = math.fsum(w.ravel())
    return 0.0 if den == 0 else math.fsum((w * e2).ravel()) / den


def _masks(pred):
    g = torch.Generator().manual_seed(2)
    per_element = pred.shape
    per_sample = pred.shape[:-1]
    return {
        "zero_one": (torch.rand(per_element, generator=g) > 0.4).double(),
        "graded": torch.rand(per_element, generator=g, dtype=torch.float64) * 5,
        "per_sample_graded": torch.rand(per_sample, generator=g, dtype=torch.float64) * 2,
        "per_sample_zero_one": (torch.rand(per_sample, generator=g) > 0.5).double(),
        "bool": torch.rand(per_element, generator=g) > 0.5,
        "int": torch.randint(0, 4, per_element, generator=g),
        "all_zero": torch.zeros(per_element, dtype=torch.float64),
    }


MASKS = list(_masks(torch.zeros(5, 3, 2)))


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", MASKS)
def test_masked_mse_equals_the_weighted_mean(kind, dtype, rtol, scripted, tmp_path):
    model = make_model((3, 8, 2), dtype=dtype)
    loss = RNNLoss(model, **ALL_ON)
    if scripted:
        loss = script_roundtrip(loss, tmp_path)
    pred, label, states = make_inputs(model, 5, 3)
    mask = _masks(pred)[kind]
    if mask.is_floating_point():
        mask = mask.to(dtype)
    _, comps = loss(pred, label, states, mask)
    _, unmasked = loss(pred, label, states)
    expected = ALL_ON["lambda_mse"] * weighted_mse_reference(pred, label, mask)
    assert comps[0].item() == pytest.approx(expected, rel=rtol, abs=0.0)
    # The other components do not read the mask.
    torch.testing.assert_close(comps[1:], unmasked[1:], rtol=0, atol=0)


def test_all_ones_mask_is_the_plain_mean():
    model = make_model(dtype=torch.float64)
    loss = RNNLoss(model)
    pred, label, _ = make_inputs(model)
    for mask in (torch.ones(pred.shape, dtype=torch.float64), torch.ones(pred.shape[:-1], dtype=torch.bool)):
        torch.testing.assert_close(loss(pred, label, None, mask)[1], loss(pred, label)[1], rtol=1e-14, atol=0)


def test_all_zero_mask_gives_zero_mse_with_zero_finite_gradient():
    model = make_model()
    loss = RNNLoss(model)
    pred, label, _ = make_inputs(model)
    pred.requires_grad_(True)
    total, comps = loss(pred, label, None, torch.zeros(pred.shape[:-1]))
    total.backward()
    assert comps[0].item() == 0.0 and pred.grad.eq(0).all()


@pytest.mark.parametrize("per_sample", [False, True], ids=["per_element", "per_sample"])
def test_gradcheck_of_the_masked_mse(per_sample):
    model = make_model((3, 4, 2), dtype=torch.float64)
    loss = RNNLoss(model, lambda_mse=0.7)
    pred, label, _ = make_inputs(model, 3, 2)
    shape = pred.shape[:-1] if per_sample else pred.shape
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pred.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: loss(p, label, None, mask)[0], (pred,))


def test_zero_weight_still_propagates_a_nan_error():
    # 0 · NaN is NaN: the formula Σ w·e² reads every element; zero the input to drop it.
    model = make_model()
    loss = RNNLoss(model)
    pred, label, _ = make_inputs(model)
    pred[0, 0, 0] = math.nan
    mask = torch.ones(pred.shape)
    mask[0, 0, 0] = 0.0
    assert math.isnan(loss(pred, label, None, mask)[1][0].item())


BAD_MASKS = {
    "wrong_shape": (lambda p: torch.ones(p.shape[0], p.shape[1], 3), ValueError,
                    "mask must have pred's shape [5, 3, 2] or pred's shape without its last axis [5, 3], "
                    "got shape [5, 3, 3]"),
    "broadcastable": (lambda p: torch.ones(1, p.shape[1], p.shape[2]), ValueError, "got shape [1, 3, 2]"),
    "negative": (lambda p: -torch.ones(p.shape), ValueError, "mask must hold finite weights >= 0"),
    "nan": (lambda p: torch.full(p.shape, math.nan), ValueError, "mask must hold finite weights >= 0"),
    "inf": (lambda p: torch.full(p.shape[:-1], math.inf), ValueError, "mask must hold finite weights >= 0"),
    "negative_int": (lambda p: -torch.ones(p.shape, dtype=torch.int64), ValueError, "mask must hold finite weights"),
    "complex": (lambda p: torch.ones(p.shape, dtype=torch.complex64), TypeError,
                "mask must be a real tensor (floating point, integer or bool), got dtype torch.complex64"),
}


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
@pytest.mark.parametrize("case", list(BAD_MASKS))
def test_bad_mask_raises_the_same_message_eager_and_scripted(case, scripted, tmp_path):
    make_mask, exc, message = BAD_MASKS[case]
    model = make_model((3, 8, 2))
    loss = RNNLoss(model, **ALL_ON)
    if scripted:
        loss = script_roundtrip(loss, tmp_path)
        exc = torch.jit.Error
    pred, label, states = make_inputs(model)
    with pytest.raises(exc) as err:
        loss(pred, label, states, make_mask(pred))
    assert message in str(err.value)
