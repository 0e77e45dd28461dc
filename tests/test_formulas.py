"""Each component against the independent float64 reference (tests/reference.py), plus hand-worked cases."""
import math
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import ALL_ON, ALL_SUBSETS, CUDA, lambdas_for, make_inputs, make_model
from reference import loss_components
from rnnloss import RNNLoss

# (time, batch, N_in, N_hid, N_out): includes B = T = 1 and N_hid = 1.
SHAPES = [(5, 3, 3, 8, 2), (1, 1, 1, 1, 1), (1, 1, 2, 4, 3), (7, 2, 4, 1, 2), (3, 4, 2, 5, 1)]


def reference_for(loss, pred, label, states):
    m = loss.model
    return loss_components(pred, label, states, m.recurrent_layer.input_layer.weight,
                           m.recurrent_layer.hidden_layer.weight, m.readout_layer.weight, loss.lambdas)


def assert_matches_reference(loss, pred, label, states, rtol):
    total, comps = loss(pred, label, states)
    ref = reference_for(loss, pred, label, states)
    assert comps.shape == (7,)
    torch.testing.assert_close(comps.double(), torch.tensor(ref, dtype=torch.float64), rtol=rtol, atol=0.0)
    assert total.dim() == 0
    assert float(total.detach()) == pytest.approx(math.fsum(ref), rel=rtol, abs=0.0)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}B{}in{}hid{}out{}".format(*s))
@pytest.mark.parametrize("active", [(i,) for i in range(7)] + [tuple(range(7))],
                         ids=lambda a: "+".join(("mse", "in", "hid", "out", "fr", "fr_sd", "fr_cv")[i] for i in a))
def test_float64_component_equals_reference_to_1e10(shape, active):
    # float64 against the float64 formulas: rtol 1e-10: only summation order differs.
    t, b, n_in, n_hid, n_out = shape
    model = make_model((n_in, n_hid, n_out), dtype=torch.float64)
    loss = RNNLoss(model, **lambdas_for(active))
    assert_matches_reference(loss, *make_inputs(model, t, b), rtol=1e-10)


@pytest.mark.parametrize("active", random.Random(7).sample(ALL_SUBSETS, 24), ids=str)
def test_random_subset_of_components_equals_reference(active):
    model = make_model((2, 6, 3), dtype=torch.float64, seed=len(active))
    loss = RNNLoss(model, **lambdas_for(active))
    assert_matches_reference(loss, *make_inputs(model, 4, 3, seed=sum(active)), rtol=1e-10)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}B{}in{}hid{}out{}".format(*s))
def test_float32_within_1e5_of_float64_reference(shape):
    # §2 accuracy: float32 results within 1e-5 relative of the float64 value of the formulas.
    t, b, n_in, n_hid, n_out = shape
    model = make_model((n_in, n_hid, n_out))
    loss = RNNLoss(model, **ALL_ON)
    assert_matches_reference(loss, *make_inputs(model, t, b), rtol=1e-5)


def _set_weights(model, w_in, w_hid, w_out):
    with torch.no_grad():
        model.recurrent_layer.input_layer.weight.copy_(torch.tensor(w_in))
        model.recurrent_layer.hidden_layer.weight.copy_(torch.tensor(w_hid))
        model.readout_layer.weight.copy_(torch.tensor(w_out))


def test_hand_worked_all_components_with_unit_lambdas():
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


def test_hand_worked_lambdas_scale_and_population_sd():
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


def test_fr_is_mean_of_squares_not_square_of_mean():
    model = make_model((1, 2, 1), dtype=torch.float64)
    loss = RNNLoss(model, lambda_mse=0.0, lambda_fr=1.0)
    states = torch.tensor([[[1.0, -1.0]]], dtype=torch.float64)  # mean 0, mean of squares 1
    _, comps = loss(torch.zeros(1, 1, 1, dtype=torch.float64), torch.zeros(1, 1, 1, dtype=torch.float64), states)
    assert comps[4].item() == 1.0


@pytest.mark.parametrize("layout", ["time_first", "batch_first", "flat_samples"])
def test_states_leading_dims_are_all_samples(layout):
    model = make_model((2, 5, 2), dtype=torch.float64)
    loss = RNNLoss(model, lambda_fr=1.0, lambda_fr_sd=1.0, lambda_fr_cv=1.0)
    pred, label, states = make_inputs(model, 6, 3)
    reshaped = {"time_first": states, "batch_first": states.transpose(0, 1),
                "flat_samples": states.reshape(-1, 5)}[layout]
    torch.testing.assert_close(loss(pred, label, reshaped)[1], loss(pred, label, states)[1], rtol=1e-12, atol=0)


@pytest.mark.slow
def test_float32_accuracy_at_ten_million_elements():
    # §2: float32 within 1e-5 relative of float64 for up to 10^7 elements (summation order).
    torch.manual_seed(0)
    model = make_model((3, 512, 2))
    loss = RNNLoss(model, lambda_mse=1.0, lambda_fr=1.0, lambda_fr_sd=1.0, lambda_fr_cv=1.0)
    states = torch.rand(610, 32, 512) * 0.5 + torch.linspace(0.2, 1.0, 512)  # 10.0 M rates
    pred, label = torch.randn(610, 32, 512), torch.randn(610, 32, 512)
    with torch.no_grad():
        _, comps = loss(pred, label, states)
    # float64 formulas written out with torch's float64 reductions (error ~1e-16 · log n).
    r = states.double().reshape(-1, 512)
    rbar = r.mean(0)
    mu = r.mean()
    sigma = ((rbar - mu) ** 2).mean().sqrt()
    ref = torch.stack([((pred.double() - label.double()) ** 2).mean(), (r ** 2).mean(), sigma, sigma / mu])
    torch.testing.assert_close(comps[[0, 4, 5, 6]].double(), ref, rtol=1e-5, atol=0)


def test_float64_inputs_get_lambda_exactly():
    # λ = 0.01 is not a float32 number: a float32 buffer would be 2.2e-9 relative off.
    model = make_model((3, 6, 2), dtype=torch.float64)
    lams = dict(lambda_mse=0.01, lambda_in=0.03, lambda_hid=0.07, lambda_out=0.11, lambda_fr=0.01,
                lambda_fr_sd=0.013, lambda_fr_cv=0.017)
    loss = RNNLoss(model, **lams)
    pred, label, states = make_inputs(model, 4, 3)
    m = loss.model
    ref = loss_components(pred, label, states, m.recurrent_layer.input_layer.weight,
                          m.recurrent_layer.hidden_layer.weight, m.readout_layer.weight, list(lams.values()))
    torch.testing.assert_close(loss(pred, label, states)[1], torch.tensor(ref, dtype=torch.float64),
                               rtol=1e-12, atol=0)


def _rates(kind, shape, g):
    if kind == "constant":
        return torch.full(shape, 0.3)
    if kind == "uniform":
        return torch.rand(shape, generator=g)
    if kind == "relu_randn":
        return torch.relu(torch.randn(shape, generator=g))
    return 10 + torch.randn(shape, generator=g)


def _spread_reference(states, n_hid):
    """σ and μ in float64, and the float32 floor: σ's error when the exact neuron means are rounded
    once to float32 (the conditioning of σ for near-constant rates)."""
    means = states.double().reshape(-1, n_hid).mean(0)
    mu = means.mean()

    def sd(m):
        return ((m - m.mean()) ** 2).mean().sqrt()
    sigma = sd(means)
    floor = (sd(means.float().double()) - sigma).abs() / sigma if sigma > 0 else torch.tensor(0.0)
    return sigma.item(), mu.item(), floor.item()


# The sums are taken differently on each device (CPU: cache-sized blocks; CUDA: whole-tensor
# reductions, row norms at any width), so the accuracy bounds are checked on both.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])]


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
@pytest.mark.parametrize("n_hid, lead", [(64, (1250, 125)), (512, (1000, 20)), (8192, (1221,))],
                         ids=["N64", "N512", "N8192"])  # N8192: a float32 row norm alone would be 1.2e-5 off
@pytest.mark.parametrize("kind", ["constant", "uniform", "relu_randn", "ten_plus_randn"])
def test_rate_terms_at_ten_million_rates_within_the_float32_bound(kind, n_hid, lead, scripted, device, tmp_path):
    # fr within 1e-5 of float64; fr_sd, fr_cv within max(1e-5, 4 × the float32 floor).
    from conftest import script_roundtrip
    g = torch.Generator().manual_seed(5)
    states = _rates(kind, (*lead, n_hid), g)
    model = make_model((1, n_hid, 1)).to(device)
    loss = RNNLoss(model, lambda_mse=0.0, lambda_fr=1.0, lambda_fr_sd=1.0, lambda_fr_cv=1.0)
    if scripted:
        loss = script_roundtrip(loss, tmp_path)
    zeros = torch.zeros(1, 1, 1, device=device)
    with torch.no_grad():
        comps = loss(zeros, zeros, states.to(device))[1].double().cpu()
    fr = states.double().square().mean().item()
    sigma, mu, floor = _spread_reference(states, n_hid)
    assert comps[4].item() == pytest.approx(fr, rel=1e-5, abs=0)
    bound = max(1e-5, 4 * floor)
    if sigma == 0.0:
        # Equal neuron means: the floor is one float32 rounding of μ-sized means, 4·ε32·μ absolute.
        assert abs(comps[5].item()) <= 4 * torch.finfo(torch.float32).eps * mu
        assert abs(comps[6].item()) <= 4 * torch.finfo(torch.float32).eps
    else:
        assert comps[5].item() == pytest.approx(sigma, rel=bound, abs=0)
        assert comps[6].item() == pytest.approx(sigma / mu, rel=bound, abs=0)


class _LargestAllocation(TorchDispatchMode):
    """Records the bytes of the largest tensor any operation allocates (views excluded)."""

    def __init__(self):
        super().__init__()
        self.largest = (0, "")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > self.largest[0]:
                    self.largest = (t.numel() * t.element_size(), str(func))
        return out


_META_LAYOUTS = {  # (rates on the meta device, whether float32 rates summed by row norms are one block)
    "time_first": (lambda dt: torch.empty(500, 256, 1024, dtype=dt, device="meta"), True),
    "batch_first_view": (lambda dt: torch.empty(256, 500, 1024, dtype=dt, device="meta").transpose(0, 1), True),
    "few_samples_many_neurons": (lambda dt: torch.empty(2000, 1, 65536, dtype=dt, device="meta"), False),
    "two_neurons": (lambda dt: torch.empty(1 << 26, 1, 2, dtype=dt, device="meta"), False),
    "neuron_subset_of_one_sequence": (lambda dt: torch.empty(1, 100000, 1024, dtype=dt, device="meta")[..., :512],
                                      False),
    "neuron_major_buffer": (lambda dt: torch.empty(16, 1 << 22, dtype=dt, device="meta").t().unsqueeze(1), False),
    "64_samples_of_4m_neurons": (lambda dt: torch.empty(64, 1 << 22, dtype=dt, device="meta"), False),
}


@pytest.mark.parametrize("dtype, row_norms", [
    (torch.float32, True),     # the eager float32 case: one block, read in place, where large enough
    (torch.float32, False),    # Σ b·b (scripted with gradients): a b² temporary per block
    (torch.float64, False),
    (torch.float16, True),     # cast to float32 per block
    (torch.bfloat16, False),
])
@pytest.mark.parametrize("layout", list(_META_LAYOUTS))
def test_gpu_recipe_reads_float32_rates_whole_and_bounds_every_temporary(dtype, row_norms, layout, monkeypatch):
    # Off the CPU the rates are taken in few, large blocks (kernel launches cost more than the
    # reads), but no temporary — a copy, a cast, b·b, per-sample norms, a stack of block sums — may
    # grow with the whole tensor: each stays within 1/8 of the rates or a float64 block of 2^24
    # rates. Checked on the meta device, which takes the GPU recipe and computes shapes only.
    from rnnloss import loss as L
    sizes = []
    parts = L._sample_parts

    def spy(*args):
        out = parts(*args)
        sizes.extend(p.numel() for p in out)
        return out
    monkeypatch.setattr(L, "_sample_parts", spy)
    build, whole = _META_LAYOUTS[layout]
    states = build(dtype)
    with _LargestAllocation() as spy_mode:
        sumsq, colsum = L._blocked_rate_sums(states, True, True, row_norms)
    assert sumsq.shape == () and colsum.shape == (states.size(-1),) and colsum.dtype == torch.float64
    assert sum(sizes) == states.numel()
    largest, op = spy_mode.largest
    assert largest <= max(states.numel() * states.element_size() // 8, 8 << 24), (largest, op)
    if whole and dtype == torch.float32 and row_norms:
        assert sizes == [states.numel()]
    else:
        assert max(sizes) <= 2 ** 24


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["constant", "uniform", "ten_plus_randn"])
def test_mse_at_ten_million_elements_within_1e5(kind):
    g = torch.Generator().manual_seed(6)
    pred = _rates(kind, (2500, 2000, 2), g)
    label = torch.zeros_like(pred) if kind == "constant" else _rates(kind, pred.shape, g)
    loss = RNNLoss(make_model((1, 4, 2)))
    with torch.no_grad():
        mse = loss(pred, label)[1][0].item()
    ref = ((pred.double() - label.double()) ** 2).mean().item()
    assert mse == pytest.approx(ref, rel=1e-5, abs=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_dimensional_states_are_one_sample(dtype):
    model = make_model((2, 3, 2), dtype=dtype)
    loss = RNNLoss(model, **ALL_ON)
    pred, label, states = make_inputs(model, 1, 1)
    torch.testing.assert_close(loss(pred, label, states.reshape(3))[1], loss(pred, label, states)[1],
                               rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
@pytest.mark.parametrize("layout", ["one_long_axis", "batch_first_view"])
def test_spread_without_fr_at_ten_million_rates_within_the_float32_bound(layout, scripted, grad, device, tmp_path):
    # Without fr only the per-neuron sums are taken (no joint sweep with Σr²), and a batch-first
    # view is not contiguous: both once summed a whole axis in one float32 reduction (1.25e-4 off
    # σ for (1, 156250, 64) rates of 10 + randn, bound 3.2e-5). Bound as above.
    from conftest import script_roundtrip
    g = torch.Generator().manual_seed(7)
    if layout == "one_long_axis":
        states = _rates("ten_plus_randn", (1, 156250, 64), g)
    else:
        states = _rates("ten_plus_randn", (125, 1250, 64), g).transpose(0, 1)
    loss = RNNLoss(make_model((1, 64, 1)).to(device), lambda_mse=0.0, lambda_fr_sd=1.0, lambda_fr_cv=1.0)
    if scripted:
        loss = script_roundtrip(loss, tmp_path)
    zeros = torch.zeros(1, 1, 1, device=device)
    with torch.set_grad_enabled(grad):
        comps = loss(zeros, zeros, states.to(device).requires_grad_(grad))[1].detach().double().cpu()
    sigma, mu, floor = _spread_reference(states, 64)
    bound = max(1e-5, 4 * floor)
    assert comps[5].item() == pytest.approx(sigma, rel=bound, abs=0)
    assert comps[6].item() == pytest.approx(sigma / mu, rel=bound, abs=0)
