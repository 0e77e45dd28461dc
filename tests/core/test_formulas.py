"""Each component against the independent float64 reference (tests/reference.py) and hand-worked cases;
the float32 accuracy bounds of the contract at up to 10^7 elements.

Tolerances: float64 against float64 formulas, 1e-10 relative (only summation order differs: ~1e-16·√n);
float32 inputs, 1e-5 relative for mse, in, hid, out, fr, and max(1e-5, 4 × the float32 floor) for fr_sd and
fr_cv, the floor being σ's change when the exact per-neuron means are rounded once to float32.
"""
import math

import pytest
import torch

from cases import ALL_ON, COVERING, DEVICES, NAMES, VALUE_MISTAKES, introduce, lambdas_for, make_inputs, make_model, \
    script_roundtrip, subset_id, weights_of
from reference import loss_components
from rnnloss import RNNLoss

# (time, batch, N_in, N_hid, N_out): includes B = T = 1 and N_hid = 1.
SHAPES = [(5, 3, 3, 8, 2), (1, 1, 1, 1, 1), (1, 1, 2, 4, 3), (7, 2, 4, 1, 2), (3, 4, 2, 5, 1)]
SHAPE_IDS = ["T{}B{}in{}hid{}out{}".format(*s) for s in SHAPES]


def assert_matches_reference(loss, pred, label, states, rtol):
    total, comps = loss(pred, label, states)
    ref = loss_components(pred, label, states, *weights_of(loss), loss.lambdas)
    assert comps.shape == (7,)
    torch.testing.assert_close(comps.double(), torch.tensor(ref, dtype=torch.float64), rtol=rtol, atol=0.0)
    assert total.dim() == 0
    assert float(total.detach()) == pytest.approx(math.fsum(ref), rel=rtol, abs=0.0)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("active", [(i,) for i in range(7)] + [tuple(range(7))], ids=subset_id)
def test_float64_component_equals_the_reference_to_1e10(shape, active):
    t, b, n_in, n_hid, n_out = shape
    model = make_model((n_in, n_hid, n_out), dtype=torch.float64)
    loss = RNNLoss(model, **lambdas_for(active))
    assert_matches_reference(loss, *make_inputs(model, t, b), rtol=1e-10)


def check_covering_set(active):
    model = make_model((2, 6, 3), dtype=torch.float64, seed=len(active))
    loss = RNNLoss(model, **lambdas_for(active))
    assert_matches_reference(loss, *make_inputs(model, 4, 3, seed=sum(active)), rtol=1e-10)


@pytest.mark.parametrize("active", COVERING, ids=subset_id)
def test_every_covering_set_of_components_equals_the_reference(active):
    check_covering_set(active)


@pytest.mark.parametrize("mistake", VALUE_MISTAKES)
def test_the_reference_sweep_fails_for_exactly_the_sets_a_deliberate_mistake_reaches(mistake, monkeypatch):
    affected, _ = introduce(monkeypatch, mistake)
    caught = []
    for active in COVERING:
        try:
            check_covering_set(active)
        except AssertionError:
            caught.append(active)
    assert caught == [a for a in COVERING if affected & set(a)]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_float32_is_within_1e5_of_the_float64_reference(shape):
    t, b, n_in, n_hid, n_out = shape
    model = make_model((n_in, n_hid, n_out))
    assert_matches_reference(RNNLoss(model, **ALL_ON), *make_inputs(model, t, b), rtol=1e-5)


def _set_weights(model, w_in, w_hid, w_out):
    with torch.no_grad():
        model.recurrent_layer.input_layer.weight.copy_(torch.tensor(w_in))
        model.recurrent_layer.hidden_layer.weight.copy_(torch.tensor(w_hid))
        model.readout_layer.weight.copy_(torch.tensor(w_out))


def test_hand_worked_case_with_unit_lambdas():
    model = make_model((1, 2, 1), dtype=torch.float64)
    # ||W_in||² = 1 + 4 = 5, / (N_in·N_hid = 2) = 2.5
    # ||W_hid||² = 1 + 1 = 2, / N_hid² = 4 -> 0.5
    # ||W_out||² = 9 + 16 = 25, / (N_out·N_hid = 2) = 12.5
    _set_weights(model, [[1.0], [2.0]], [[1.0, 0.0], [0.0, -1.0]], [[3.0, 4.0]])
    loss = RNNLoss(model, **{k: 1.0 for k in ALL_ON})
    pred = torch.tensor([[[1.0]], [[3.0]]], dtype=torch.float64)   # (T=2, B=1, N_out=1)
    label = torch.tensor([[[0.0]], [[1.0]]], dtype=torch.float64)  # errors 1, 2 -> (1 + 4) / 2 = 2.5
    # rates (T=2, B=1, N_hid=2): r² = 1, 9, 9, 25 -> 44 / 4 = 11
    # neuron means 2 and 4, mu = 3, sigma = sqrt(((2-3)² + (4-3)²) / 2) = 1, CV = 1/3
    states = torch.tensor([[[1.0, 3.0]], [[3.0, 5.0]]], dtype=torch.float64)
    total, comps = loss(pred, label, states)
    expected = [2.5, 2.5, 0.5, 12.5, 11.0, 1.0, 1.0 / 3.0]
    assert comps.tolist() == pytest.approx(expected, rel=1e-12)
    assert total.item() == pytest.approx(sum(expected), rel=1e-12)


def test_hand_worked_lambdas_scale_and_the_sd_is_the_population_sd():
    model = make_model((1, 3, 1), dtype=torch.float64)
    loss = RNNLoss(model, lambda_mse=2.0, lambda_fr_sd=0.5, lambda_fr_cv=3.0)
    label = torch.zeros(1, 2, 1, dtype=torch.float64)
    pred = label + 1.0  # every error 1 -> mse 1, times lambda 2 = 2
    # (T=1, B=2, N_hid=3): neuron means (0+0)/2 = 0, (0+2)/2 = 1, (6+4)/2 = 5; mu = 6/3 = 2
    # deviations -2, -1, 3 -> (4 + 1 + 9) / 3 = 14/3 (population: divide by N_hid = 3)
    states = torch.tensor([[[0.0, 0.0, 6.0], [0.0, 2.0, 4.0]]], dtype=torch.float64)
    sigma = math.sqrt(14.0 / 3.0)
    total, comps = loss(pred, label, states)
    expected = [2.0, 0.0, 0.0, 0.0, 0.0, 0.5 * sigma, 3.0 * sigma / 2.0]
    assert comps.tolist() == pytest.approx(expected, rel=1e-12)
    assert total.item() == pytest.approx(2.0 + 2.0 * sigma, rel=1e-12)


def test_fr_is_the_mean_of_squares_not_the_square_of_the_mean():
    loss = RNNLoss(make_model((1, 2, 1), dtype=torch.float64), lambda_mse=0.0, lambda_fr=1.0)
    states = torch.tensor([[[1.0, -1.0]]], dtype=torch.float64)  # mean 0, mean of squares 1
    zeros = torch.zeros(1, 1, 1, dtype=torch.float64)
    assert loss(zeros, zeros, states)[1][4].item() == 1.0


@pytest.mark.parametrize("layout", ["time_first", "batch_first", "flat_samples"])
def test_every_leading_dimension_of_states_is_a_sample(layout):
    model = make_model((2, 5, 2), dtype=torch.float64)
    loss = RNNLoss(model, lambda_fr=1.0, lambda_fr_sd=1.0, lambda_fr_cv=1.0)
    pred, label, states = make_inputs(model, 6, 3)
    reshaped = {"time_first": states, "batch_first": states.transpose(0, 1),
                "flat_samples": states.reshape(-1, 5)}[layout]
    torch.testing.assert_close(loss(pred, label, reshaped)[1], loss(pred, label, states)[1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_dimensional_states_are_one_sample(dtype):
    model = make_model((2, 3, 2), dtype=dtype)
    loss = RNNLoss(model, **ALL_ON)
    pred, label, states = make_inputs(model, 1, 1)
    torch.testing.assert_close(loss(pred, label, states.reshape(3))[1], loss(pred, label, states)[1],
                               rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
def test_float64_inputs_get_lambda_exactly(scripted):
    # λ = 0.01 is not a float32 number: a buffer that went through float32 would be 2.2e-9 relative off.
    model = make_model((3, 6, 2), dtype=torch.float64)
    lams = dict(lambda_mse=0.01, lambda_in=0.03, lambda_hid=0.07, lambda_out=0.11, lambda_fr=0.01,
                lambda_fr_sd=0.013, lambda_fr_cv=0.017)
    loss = RNNLoss(model, **lams)
    if scripted:
        loss = script_roundtrip(loss)
    pred, label, states = make_inputs(model, 4, 3)
    ref = loss_components(pred, label, states, *weights_of(model), list(lams.values()))
    torch.testing.assert_close(loss(pred, label, states)[1], torch.tensor(ref, dtype=torch.float64),
                               rtol=1e-12, atol=0)


# ---- the float32 bounds at 10^7 elements (§2 accuracy)

def _rates(kind, shape, g):
    if kind == "constant":
        return torch.full(shape, 0.3)
    if kind == "uniform":
        return torch.rand(shape, generator=g)
    if kind == "relu_randn":
        return torch.relu(torch.randn(shape, generator=g))
    return 10 + torch.randn(shape, generator=g)


def _spread_reference(states, n_hid):
    """σ and μ in float64, and the float32 floor: σ's relative error when the exact neuron means are rounded
    once to float32 (the conditioning of σ for near-constant rates)."""
    means = states.double().reshape(-1, n_hid).mean(0)
    mu = means.mean()

    def sd(m):
        return ((m - m.mean()) ** 2).mean().sqrt()
    sigma = sd(means)
    floor = (sd(means.float().double()) - sigma).abs() / sigma if sigma > 0 else torch.tensor(0.0)
    return sigma.item(), mu.item(), floor.item()


def _assert_spread_within_the_bound(comps, states, n_hid):
    sigma, mu, floor = _spread_reference(states, n_hid)
    bound = max(1e-5, 4 * floor)
    if sigma == 0.0:
        # Equal neuron means: the floor is one float32 rounding of μ-sized means, 4·ε32·μ absolute.
        assert abs(comps[5].item()) <= 4 * torch.finfo(torch.float32).eps * mu
        assert abs(comps[6].item()) <= 4 * torch.finfo(torch.float32).eps
    else:
        assert comps[5].item() == pytest.approx(sigma, rel=bound, abs=0)
        assert comps[6].item() == pytest.approx(sigma / mu, rel=bound, abs=0)


@pytest.mark.slow
def test_float32_is_within_1e5_of_float64_at_ten_million_elements():
    model = make_model((3, 512, 2))
    loss = RNNLoss(model, lambda_mse=1.0, lambda_fr=1.0, lambda_fr_sd=1.0, lambda_fr_cv=1.0)
    g = torch.Generator().manual_seed(0)
    states = torch.rand(610, 32, 512, generator=g) * 0.5 + torch.linspace(0.2, 1.0, 512)  # 10.0 M rates
    pred, label = torch.randn(610, 32, 512, generator=g), torch.randn(610, 32, 512, generator=g)
    with torch.no_grad():
        _, comps = loss(pred, label, states)
    # float64 formulas with torch's float64 (pairwise) reductions: error ~1e-16 · log n.
    r = states.double().reshape(-1, 512)
    rbar = r.mean(0)
    mu = r.mean()
    sigma = ((rbar - mu) ** 2).mean().sqrt()
    ref = torch.stack([((pred.double() - label.double()) ** 2).mean(), (r ** 2).mean(), sigma, sigma / mu])
    torch.testing.assert_close(comps[[0, 4, 5, 6]].double(), ref, rtol=1e-5, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
@pytest.mark.parametrize("n_hid, lead", [(64, (1250, 125)), (512, (1000, 20)), (8192, (1221,))],
                         ids=["N64", "N512", "N8192"])  # N8192: a float32 row norm alone would be 1.2e-5 off
@pytest.mark.parametrize("kind", ["constant", "uniform", "relu_randn", "ten_plus_randn"])
def test_rate_terms_at_ten_million_rates_are_within_the_float32_bound(kind, n_hid, lead, scripted, device):
    g = torch.Generator().manual_seed(5)
    states = _rates(kind, (*lead, n_hid), g)
    loss = RNNLoss(make_model((1, n_hid, 1)).to(device), lambda_mse=0.0, lambda_fr=1.0, lambda_fr_sd=1.0,
                   lambda_fr_cv=1.0)
    if scripted:
        loss = script_roundtrip(loss)
    zeros = torch.zeros(1, 1, 1, device=device)
    with torch.no_grad():
        comps = loss(zeros, zeros, states.to(device))[1].double().cpu()
    assert comps[4].item() == pytest.approx(states.double().square().mean().item(), rel=1e-5, abs=0)
    _assert_spread_within_the_bound(comps, states, n_hid)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
@pytest.mark.parametrize("layout", ["one_long_axis", "batch_first_view"])
def test_spread_without_fr_at_ten_million_rates_is_within_the_float32_bound(layout, scripted, grad, device):
    # Without fr only the per-neuron sums are taken, and a batch-first view is not contiguous: both once
    # summed a whole axis in one float32 reduction (1.25e-4 off σ for (1, 156250, 64) rates of 10 + randn,
    # bound 3.2e-5).
    g = torch.Generator().manual_seed(7)
    if layout == "one_long_axis":
        states = _rates("ten_plus_randn", (1, 156250, 64), g)
    else:
        states = _rates("ten_plus_randn", (125, 1250, 64), g).transpose(0, 1)
    loss = RNNLoss(make_model((1, 64, 1)).to(device), lambda_mse=0.0, lambda_fr_sd=1.0, lambda_fr_cv=1.0)
    if scripted:
        loss = script_roundtrip(loss)
    zeros = torch.zeros(1, 1, 1, device=device)
    with torch.set_grad_enabled(grad):
        comps = loss(zeros, zeros, states.to(device).requires_grad_(grad))[1].detach().double().cpu()
    _assert_spread_within_the_bound(comps, states, 64)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["constant", "uniform", "ten_plus_randn"])
def test_mse_at_ten_million_elements_is_within_1e5(kind):
    g = torch.Generator().manual_seed(6)
    pred = _rates(kind, (2500, 2000, 2), g)
    label = torch.zeros_like(pred) if kind == "constant" else _rates(kind, pred.shape, g)
    with torch.no_grad():
        mse = RNNLoss(make_model((1, 4, 2)))(pred, label)[1][0].item()
    assert mse == pytest.approx(((pred.double() - label.double()) ** 2).mean().item(), rel=1e-5, abs=0)


def test_component_names_are_the_contracts_order():
    loss = RNNLoss(make_model())
    assert tuple(loss.component_names) == NAMES
    assert loss.named(torch.arange(7.0)) == {n: float(i) for i, n in enumerate(NAMES)}
