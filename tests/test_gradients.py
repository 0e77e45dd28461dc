"""Gradients: gradcheck in float64, inactive components, σ = 0, stability and non-finite inputs."""
import pytest
import torch
from torch.func import functional_call

from conftest import ALL_ON, CUDA, NAMES, lambdas_for, make_inputs, make_model, script_roundtrip
from rnnloss import RNNLoss

W_KEYS = ("model.recurrent_layer.input_layer.weight", "model.recurrent_layer.hidden_layer.weight",
          "model.readout_layer.weight")


@pytest.mark.parametrize("index", range(7), ids=NAMES)
def test_gradcheck_each_component_wrt_pred_states_and_weights(index):
    model = make_model((3, 5, 2), dtype=torch.float64)
    loss = RNNLoss(model, **lambdas_for((index,)))
    pred, label, states = make_inputs(model, 3, 2)
    weights = [dict(loss.named_parameters())[k].detach().clone() for k in W_KEYS]
    inputs = [pred, states, *weights]
    for t in inputs:
        t.requires_grad_(True)

    def f(pred, states, w_in, w_hid, w_out):
        return functional_call(loss, dict(zip(W_KEYS, (w_in, w_hid, w_out))), (pred, label, states))[1][index]

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_all_components_together():
    model = make_model((2, 4, 3), dtype=torch.float64)
    loss = RNNLoss(model, **ALL_ON)
    pred, label, states = make_inputs(model, 2, 3)
    pred.requires_grad_(True)
    states.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p, s: loss(p, label, s)[0], (pred, states))


@pytest.mark.parametrize("index", range(7), ids=NAMES)
def test_inactive_component_is_exactly_zero_and_its_input_gets_no_gradient(index):
    model = make_model()
    loss = RNNLoss(model, **lambdas_for(tuple(i for i in range(7) if i != index)))
    pred, label, states = make_inputs(model)
    pred.requires_grad_(True)
    total, comps = loss(pred, label, states)
    assert comps[index].item() == 0.0
    assert all(comps[i].item() != 0.0 for i in range(7) if i != index)
    total.backward()
    weights = {1: model.recurrent_layer.input_layer.weight, 2: model.recurrent_layer.hidden_layer.weight,
               3: model.readout_layer.weight}
    for i, w in weights.items():
        assert (w.grad is None) == (i == index), NAMES[i]
    assert (pred.grad is None) == (index == 0)


def test_mse_only_sends_no_gradient_to_states_or_weights():
    model = make_model()
    loss = RNNLoss(model)  # defaults: mse only
    pred, label, states = make_inputs(model)
    pred.requires_grad_(True)
    states.requires_grad_(True)
    total, comps = loss(pred, label, states)
    assert comps[1:].eq(0).all()
    total.backward()
    assert states.grad is None and pred.grad is not None
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("value", [0.0, 0.7, 1e3], ids=["all_zero", "all_equal", "all_equal_large"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equal_rates_give_zero_sd_cv_and_finite_gradients(value, dtype):
    model = make_model((2, 6, 2), dtype=dtype)
    loss = RNNLoss(model, lambda_fr=1.0, lambda_fr_sd=1.0, lambda_fr_cv=1.0)
    pred, label, _ = make_inputs(model)
    states = torch.full((5, 3, 6), value, dtype=dtype, requires_grad=True)
    total, comps = loss(pred, label, states)
    total.backward()
    assert torch.isfinite(states.grad).all()
    # Equal rates: σ is 0 up to rounding of the neuron means (an ulp of the value), CV likewise.
    eps = torch.finfo(dtype).eps
    assert abs(comps[5].item()) <= 4 * eps * max(value, 1.0)
    assert abs(comps[6].item()) <= 4 * eps
    if value == 0.0:
        assert comps[5].item() == 0.0 and comps[6].item() == 0.0
        assert states.grad.eq(0).all()


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
@pytest.mark.parametrize("n_hid", [3, 5, 7, 8])
def test_neurons_with_identical_rates_give_exactly_zero_spread(n_hid, scripted, tmp_path):
    # Every neuron gets the same rates, so the neuron means are equal and σ is exactly 0 — not a
    # rounding residue: a plain mean of 7 equal float64 means need not round back to them (it gave
    # σ ≈ 5.6e-17 for 87 of 300 such float32 draws at N_hid = 7).
    loss = RNNLoss(make_model((1, n_hid, 1)), lambda_mse=0.0, lambda_fr_sd=1.0, lambda_fr_cv=1.0)
    if scripted:
        loss = script_roundtrip(loss, tmp_path)
    zeros = torch.zeros(1, 1, 1)
    g = torch.Generator().manual_seed(n_hid)
    for _ in range(100):
        states = torch.rand(6, 1, generator=g).repeat(1, n_hid).requires_grad_(True)
        comps = loss(zeros, zeros, states)[1]
        assert comps[5].item() == 0.0 and comps[6].item() == 0.0
        (grad,) = torch.autograd.grad(comps[5] + comps[6], states)
        assert grad.eq(0).all()


def test_single_neuron_has_zero_spread():
    model = make_model((1, 1, 1))
    loss = RNNLoss(model, lambda_fr_sd=1.0, lambda_fr_cv=1.0)
    pred, label, states = make_inputs(model)
    states.requires_grad_(True)
    total, comps = loss(pred, label, states)
    total.backward()
    assert comps[5].item() == 0.0 and comps[6].item() == 0.0
    assert torch.isfinite(states.grad).all()


def test_spread_is_stable_for_large_mean_and_tiny_spread():
    # Mean rate 1e3, spread ~0.03 across neurons: E[x²] − E[x]² in float32 would be all rounding
    # noise (1e6 has an ulp of 0.06); deviations from the mean keep σ to a few percent.
    g = torch.Generator().manual_seed(0)
    n = 32
    offsets = torch.linspace(-0.05, 0.05, n, dtype=torch.float64)
    states64 = 1e3 + offsets + 1e-3 * torch.randn(40, 8, n, generator=g, dtype=torch.float64)
    model = make_model((1, n, 1))
    loss = RNNLoss(model, lambda_fr_sd=1.0, lambda_fr_cv=1.0)
    pred = torch.zeros(2, 2, 1)
    _, comps = loss(pred, pred, states64.float())
    rbar = states64.float().double().reshape(-1, n).mean(0)
    sigma = (rbar - rbar.mean()).pow(2).mean().sqrt().item()
    assert comps[5].item() == pytest.approx(sigma, rel=0.03)
    assert comps[6].item() == pytest.approx(sigma / rbar.mean().item(), rel=0.03)


def test_zero_mean_with_spread_gives_infinite_cv():
    model = make_model((1, 2, 1))
    loss = RNNLoss(model, lambda_fr_sd=1.0, lambda_fr_cv=1.0)
    states = torch.tensor([[[1.0, -1.0]]])  # neuron means 1 and -1: μ = 0, σ = 1
    _, comps = loss(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), states)
    assert comps[5].item() == 1.0
    assert comps[6].item() == float("inf")


@pytest.mark.parametrize("where", ["pred", "label", "states"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_inputs_propagate_to_every_component_that_reads_them(where, bad):
    model = make_model()
    loss = RNNLoss(model, **ALL_ON)
    inputs = dict(zip(("pred", "label", "states"), make_inputs(model)))
    inputs[where][1, 0, 0] = bad
    total, comps = loss(inputs["pred"], inputs["label"], inputs["states"])
    readers = {"pred": [0], "label": [0], "states": [4, 5, 6]}[where]
    for i in range(7):
        assert torch.isfinite(comps[i]).item() == (i not in readers), NAMES[i]
    assert not torch.isfinite(total)
    if where == "states":
        assert torch.isnan(comps[5]) and torch.isnan(comps[6])  # never masked to 0 by the σ = 0 guard
        # fr is inf for an infinite rate and NaN for a NaN, with or without a gradient wanted.
        states = inputs["states"].clone().requires_grad_(True)
        with_grad = loss(inputs["pred"], inputs["label"], states)[1].detach()
        for fr in (comps[4].item(), with_grad[4].item()):
            assert fr == float("inf") if bad == float("inf") else fr != fr


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_accumulate_and_return_float32(dtype, device):
    from reference import loss_components
    model = make_model((3, 8, 2)).to(device)
    loss = RNNLoss(model, **ALL_ON)
    pred, label, states = make_inputs(model, 9, 4, dtype=dtype, device=device)
    total, comps = loss(pred, label, states)
    assert total.dtype == torch.float32 and comps.dtype == torch.float32
    m = model
    ref = loss_components(pred, label, states, m.recurrent_layer.input_layer.weight,
                          m.recurrent_layer.hidden_layer.weight, m.readout_layer.weight, loss.lambdas)
    # The inputs are exactly representable in float32; accumulation in float32 keeps 1e-5.
    torch.testing.assert_close(comps.detach().cpu().double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_blocked_rate_sums_match_the_formula_and_its_gradient(layout):
    # 300·40·64 = 768k rates: the per-row and per-block sums; the gradient from the fused backward.
    model = make_model((1, 64, 1), dtype=torch.float64)
    loss = RNNLoss(model, lambda_mse=0.0, lambda_fr=0.5)
    g = torch.Generator().manual_seed(3)
    base = torch.rand(300, 40, 64, generator=g, dtype=torch.float64)
    states = (base if layout == "contiguous" else base.transpose(0, 1)).requires_grad_(True)
    zeros = torch.zeros(1, 1, 1, dtype=torch.float64)
    total, comps = loss(zeros, zeros, states)
    total.backward()
    n = states.numel()
    assert comps[4].item() == pytest.approx(0.5 * (base ** 2).sum().item() / n, rel=1e-12)
    torch.testing.assert_close(states.grad, 0.5 * 2 * states.detach() / n, rtol=1e-12, atol=0)
    with torch.no_grad():
        assert loss(zeros, zeros, states)[1][4].item() == comps[4].item()  # no-grad value identical


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
def test_fr_gradient_stays_finite_when_the_float32_sum_of_squares_overflows(scripted, tmp_path):
    # r = 1e20: r² overflows float32, so fr is inf, but the formula's gradient 2λr/n is finite.
    model = make_model((1, 4, 1))
    loss = RNNLoss(model, lambda_mse=0.0, lambda_fr=0.5)
    if scripted:
        loss = script_roundtrip(loss, tmp_path)
    states = torch.full((3, 2, 4), 1e20, requires_grad=True)
    zeros = torch.zeros(1, 1, 1)
    total, comps = loss(zeros, zeros, states)
    assert comps[4].item() == float("inf")
    (grad,) = torch.autograd.grad(comps[4], states)
    torch.testing.assert_close(grad, torch.full_like(states, 0.5 * 2 * 1e20 / states.numel()), rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", ["fr", "fr_sd"])
def test_scripted_with_gradients_gives_eager_values_where_a_float32_sum_overflows(case, tmp_path):
    # fr: every rate 9e18, so fr = 8.1e37 fits float32 but Σr² over the 256 rates does not.
    # fr_sd: neuron means 1e33 and 2e33 (σ = 5e32) over 2^19 + 1 samples: float32 column sums over
    # all samples overflow. The scripted gradient path then takes its graph's sums in float64.
    if case == "fr":
        loss = RNNLoss(make_model((1, 4, 1)), lambda_mse=0.0, lambda_fr=1.0)
        states, index, want = torch.full((64, 4), 9e18), 4, 9e18 ** 2
    else:
        loss = RNNLoss(make_model((1, 2, 1)), lambda_mse=0.0, lambda_fr_sd=1.0)
        states, index, want = torch.tensor([1e33, 2e33]).repeat(2 ** 19 + 1, 1), 5, 5e32
    scripted = script_roundtrip(loss, tmp_path)
    zeros = torch.zeros(1, 1, 1)
    states.requires_grad_(True)
    got_e, got_s = loss(zeros, zeros, states)[1][index], scripted(zeros, zeros, states)[1][index]
    assert got_e.item() == pytest.approx(want, rel=1e-6)  # float32 rounding of the inputs and result
    assert got_s.item() == got_e.item()
    (grad_e,), (grad_s,) = torch.autograd.grad(got_e, states), torch.autograd.grad(got_s, states)
    assert torch.isfinite(grad_s).all()
    torch.testing.assert_close(grad_s, grad_e, rtol=1e-5, atol=0)


def test_per_sample_gradients_with_torch_func_equal_a_loop_over_samples():
    # torch.func.vmap(grad(...)) goes through the eager fast path's autograd Function.
    from torch.func import grad, vmap

    from rnnloss.trainer import CTRNNTrainer
    model = make_model((3, 6, 2), dtype=torch.float64, activation="softplus")
    trainer = CTRNNTrainer(RNNLoss(model, **ALL_ON))  # model + loss: one functional call
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5, 4, 3, generator=g, dtype=torch.float64)
    y = torch.randn(5, 4, 2, generator=g, dtype=torch.float64)
    params = {k: v.detach() for k, v in trainer.named_parameters() if v.requires_grad}

    def one_sample(p, xb, yb):
        return functional_call(trainer, p, (xb.unsqueeze(1), yb.unsqueeze(1)))[0]

    batched = vmap(grad(one_sample), in_dims=(None, 1, 1))(params, x, y)
    for b in range(4):
        trainer.zero_grad()
        trainer(x[:, b:b + 1], y[:, b:b + 1])[0].backward()
        for name, p in trainer.named_parameters():
            if p.requires_grad:  # float64, same formulas: rounding-level agreement
                torch.testing.assert_close(batched[name][b], p.grad, rtol=1e-10, atol=1e-14, msg=name)
