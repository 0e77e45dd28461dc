"""The optional mask weighting the task error: values, gradients, refusals (eager and scripted).

mse = λ_mse · Σ w·(pred − label)² / Σ w, with per-sample weights (pred's shape without its last axis) counted
once per output. References: NumPy float64 with math.fsum (reference.weighted_mse).
"""
import math

import pytest
import torch

from cases import ALL_ON, make_inputs, make_model, script_roundtrip
from reference import weighted_mse
from rnnloss import RNNLoss


def _masks(pred):
    g = torch.Generator().manual_seed(2)
    per_element, per_sample = pred.shape, pred.shape[:-1]
    return {
        "zero_one": (torch.rand(per_element, generator=g) > 0.4).double(),
        "graded": torch.rand(per_element, generator=g, dtype=torch.float64) * 5,
        "per_sample_graded": torch.rand(per_sample, generator=g, dtype=torch.float64) * 2,
        "per_sample_zero_one": (torch.rand(per_sample, generator=g) > 0.5).double(),
        "bool": torch.rand(per_element, generator=g) > 0.5,
        "int": torch.randint(0, 4, per_element, generator=g),
        "uint8_per_sample": torch.randint(0, 3, per_sample, generator=g, dtype=torch.uint8),
        "all_zero": torch.zeros(per_element, dtype=torch.float64),
    }


MASKS = list(_masks(torch.zeros(5, 3, 2)))
SCRIPTED = pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])


@SCRIPTED
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", MASKS)
def test_masked_mse_equals_the_weighted_mean(kind, dtype, rtol, scripted):
    model = make_model((3, 8, 2), dtype=dtype)
    loss = RNNLoss(model, **ALL_ON)
    if scripted:
        loss = script_roundtrip(loss)
    pred, label, states = make_inputs(model, 5, 3)
    mask = _masks(pred)[kind]
    if mask.is_floating_point():
        mask = mask.to(dtype)
    _, comps = loss(pred, label, states, mask)
    _, unmasked = loss(pred, label, states)
    assert comps[0].item() == pytest.approx(ALL_ON["lambda_mse"] * weighted_mse(pred, label, mask), rel=rtol, abs=0.0)
    torch.testing.assert_close(comps[1:], unmasked[1:], rtol=0, atol=0)  # the other components ignore the mask


@SCRIPTED
@pytest.mark.parametrize("dtype, scale", [(torch.float64, 1e-50), (torch.float64, 1e-300), (torch.float32, 1e-40),
                                          (torch.float32, 1.5e-45)],
                         ids=["f64_1e-50", "f64_1e-300", "f32_subnormal", "f32_smallest_subnormal"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["per_element", "per_sample"])
def test_tiny_and_subnormal_weights_give_the_float64_weighted_mean(per_sample, dtype, scale, scripted):
    # Masked sums are taken in float64, so float32 weights down to the smallest subnormal and float64 weights
    # down to float64's normal range (2.2e-308; below it, the documented limit, digits are lost) give the
    # float64 ratio: within 1e-6 relative (float32 inputs: their own rounding, ~1e-7, dominates; the weights
    # themselves are exact multiples of the scale).
    model = make_model((3, 8, 2), dtype=dtype)
    loss = RNNLoss(model)
    if scripted:
        loss = script_roundtrip(loss)
    pred, label, _ = make_inputs(model, 5, 3)
    shape = pred.shape[:-1] if per_sample else pred.shape
    steps = torch.randint(0, 4, shape, generator=torch.Generator().manual_seed(3)).double()
    steps.view(-1)[0] = 3.0  # the largest weight is 3·scale
    mask = (steps * scale).to(dtype)
    assert mask.max().item() > 0 and (mask == 0).sum() == (steps == 0).sum()  # representable: nothing flushed to 0
    mse = loss(pred, label, None, mask)[1][0].item()
    assert math.isfinite(mse)
    assert mse == pytest.approx(weighted_mse(pred, label, steps), rel=1e-6, abs=0.0)


def test_an_all_ones_mask_is_the_plain_mean():
    model = make_model(dtype=torch.float64)
    loss = RNNLoss(model)
    pred, label, _ = make_inputs(model)
    for mask in (torch.ones(pred.shape, dtype=torch.float64), torch.ones(pred.shape[:-1], dtype=torch.bool)):
        torch.testing.assert_close(loss(pred, label, None, mask)[1], loss(pred, label)[1], rtol=1e-14, atol=0)


@SCRIPTED
def test_an_all_zero_mask_gives_zero_mse_with_a_zero_finite_gradient(scripted):
    model = make_model()
    loss = RNNLoss(model)
    if scripted:
        loss = script_roundtrip(loss)
    pred, label, _ = make_inputs(model)
    pred.requires_grad_(True)
    total, comps = loss(pred, label, None, torch.zeros(pred.shape[:-1]))
    total.backward()
    assert comps[0].item() == 0.0 and pred.grad.eq(0).all()


@pytest.mark.parametrize("per_sample", [False, True], ids=["per_element", "per_sample"])
def test_gradcheck_of_the_masked_mse(per_sample):
    loss = RNNLoss(make_model((3, 4, 2), dtype=torch.float64), lambda_mse=0.7)
    pred, label, _ = make_inputs(loss.model, 3, 2)
    shape = pred.shape[:-1] if per_sample else pred.shape
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pred.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: loss(p, label, None, mask)[0], (pred,))


def test_a_zero_weight_still_propagates_a_nan_error():
    # 0 · NaN is NaN: the formula Σ w·e² reads every element; zero the input to drop it.
    model = make_model()
    pred, label, _ = make_inputs(model)
    pred[0, 0, 0] = math.nan
    mask = torch.ones(pred.shape)
    mask[0, 0, 0] = 0.0
    assert math.isnan(RNNLoss(model)(pred, label, None, mask)[1][0].item())


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
    "other_device": (lambda p: torch.ones(p.shape, device="meta"), ValueError,
                     "mask must be on the device of pred (cpu), got meta"),
}


@SCRIPTED
@pytest.mark.parametrize("case", list(BAD_MASKS))
def test_a_bad_mask_raises_the_same_message_eager_and_scripted(case, scripted):
    make_mask, exc, message = BAD_MASKS[case]
    model = make_model((3, 8, 2))
    loss = RNNLoss(model, **ALL_ON)
    if scripted:
        loss = script_roundtrip(loss)
        exc = torch.jit.Error  # TorchScript re-raises as torch.jit.Error carrying the same text
    pred, label, states = make_inputs(model)
    with pytest.raises(exc) as err:
        loss(pred, label, states, make_mask(pred))
    assert message in str(err.value)
