"""First-order gradients: gradcheck in float64, inactive components, σ = 0, stability, non-finite inputs,
half precision, per-sample gradients and torch.func on the scripted module."""
import pytest
import torch
from torch.func import functional_call

from cases import ALL_ON, DEVICES, NAMES, W_KEYS, lambdas_for, make_inputs, make_model, script_roundtrip, weights_of
from reference import loss_components
from rnnloss import RNNLoss


@pytest.mark.parametrize("index", range(7), ids=NAMES)
def test_gradcheck_of_each_component_wrt_pred_states_and_weights(index):
    loss = RNNLoss(make_model((3, 5, 2), dtype=torch.float64), **lambdas_for((index,)))
    pred, label, states = make_inputs(loss.model, 3, 2)
    weights = [dict(loss.named_parameters())[k].detach().clone() for k in W_KEYS]
    inputs = [t.requires_grad_(True) for t in (pred, states, *weights)]

    def f(pred, states, w_in, w_hid, w_out):
        return functional_call(loss, dict(zip(W_KEYS, (w_in, w_hid, w_out))), (pred, label, states))[1][index]

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
def test_gradcheck_of_all_components_together(scripted):
    loss = RNNLoss(make_model((2, 4, 3), dtype=torch.float64), **ALL_ON)
    pred, label, states = make_inputs(loss.model, 2, 3)
    if scripted:
        loss = script_roundtrip(loss)
    inputs = (pred.requires_grad_(True), states.requires_grad_(True))
    assert torch.autograd.gradcheck(lambda p, s: loss(p, label, s)[0], inputs)


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
    for i, w in zip((1, 2, 3), weights_of(model)):
        assert (w.grad is None) == (i == index), NAMES[i]
    assert (pred.grad is None) == (index == 0)


def test_mse_alone_sends_no_gradient_to_states_or_weights():
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
def test_equal_rates_give_zero_sd_and_cv_with_finite_gradients(value, dtype):
    model = make_model((2, 6, 2), dtype=dtype)
    loss = RNNLoss(model, lambda_fr=1.0, lambda_fr_sd=1.0, lambda_fr_cv=1.0)
    pred, label, _ = make_inputs(model)
    states = torch.full((5, 3, 6), value, dtype=dtype, requires_grad=True)
    total, comps = loss(pred, label, states)
    total.backward()
    assert torch.isfinite(states.grad).all()
    # Equal rates: σ is 0 up to the rounding of the neuron means (an ulp of the value), the CV likewise.
    eps = torch.finfo(dtype).eps
    assert abs(comps[5].item()) <= 4 * eps * max(value, 1.0)
    assert abs(comps[6].item()) <= 4 * eps
    if value == 0.0:
        assert comps[5].item() == 0.0 and comps[6].item() == 0.0
        assert states.grad.eq(0).all()


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
@pytest.mark.parametrize("n_hid", [3, 5, 7, 8])
def test_neurons_with_identical_rates_give_exactly_zero_spread_and_gradient(n_hid, scripted):
    # Equal neuron means make σ exactly 0 — not a rounding residue: a plain mean of 7 equal float64 means need
    # not round back to them (σ ≈ 5.6e-17 for 87 of 300 such float32 draws at N_hid = 7).
    loss = RNNLoss(make_model((1, n_hid, 1)), lambda_mse=0.0, lambda_fr_sd=1.0, lambda_fr_cv=1.0)
    if scripted:
        loss = script_roundtrip(loss)
    zeros = torch.zeros(1, 1, 1)
    g = torch.Generator().manual_seed(n_hid)
    for _ in range(40):
        states = torch.rand(6, 1, generator=g).repeat(1, n_hid).requires_grad_(True)
        comps = loss(zeros, zeros, states)[1]
        assert comps[5].item() == 0.0 and comps[6].item() == 0.0
        (grad,) = torch.autograd.grad(comps[5] + comps[6], states)
        assert grad.eq(0).all()


def test_a_single_neuron_has_zero_spread():
    model = make_model((1, 1, 1))
    loss = RNNLoss(model, lambda_fr_sd=1.0, lambda_fr_cv=1.0)
    pred, label, states = make_inputs(model)
    states.requires_grad_(True)
    total, comps = loss(pred, label, states)
    total.backward()
    assert comps[5].item() == 0.0 and comps[6].item() == 0.0
    assert torch.isfinite(states.grad).all()


def test_spread_is_stable_for_a_large_mean_and_a_tiny_spread():
    # Mean rate 1e3, spread ~0.03 across neurons: E[x²] − E[x]² in float32 would be all rounding noise (1e6
    # has an ulp of 0.06); deviations from the mean keep σ to a few percent.
    g = torch.Generator().manual_seed(0)
    n = 32
    offsets = torch.linspace(-0.05, 0.05, n, dtype=torch.float64)
    states64 = 1e3 + offsets + 1e-3 * torch.randn(40, 8, n, generator=g, dtype=torch.float64)
    loss = RNNLoss(make_model((1, n, 1)), lambda_fr_sd=1.0, lambda_fr_cv=1.0)
    pred = torch.zeros(2, 2, 1)
    _, comps = loss(pred, pred, states64.float())
    rbar = states64.float().double().reshape(-1, n).mean(0)
    sigma = (rbar - rbar.mean()).pow(2).mean().sqrt().item()
    assert comps[5].item() == pytest.approx(sigma, rel=0.03)
    assert comps[6].item() == pytest.approx(sigma / rbar.mean().item(), rel=0.03)


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
def test_zero_mean_with_a_spread_gives_an_infinite_cv(scripted):
    loss = RNNLoss(make_model((1, 2, 1)), lambda_fr_sd=1.0, lambda_fr_cv=1.0)
    if scripted:
        loss = script_roundtrip(loss)
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_accumulate_and_return_float32(dtype, device):
    model = make_model((3, 8, 2)).to(device)
    loss = RNNLoss(model, **ALL_ON)
    pred, label, states = make_inputs(model, 9, 4, dtype=dtype, device=device)
    total, comps = loss(pred, label, states)
    assert total.dtype == torch.float32 and comps.dtype == torch.float32
    ref = loss_components(pred, label, states, *weights_of(model), loss.lambdas)
    # The inputs are exact in float32; accumulating in float32 keeps 1e-5.
    torch.testing.assert_close(comps.detach().cpu().double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=0)


def test_vmap_over_pred_and_label_with_shared_rates_equals_a_loop():
    # The rates are not batched, so the eager rate sums' autograd Function runs under vmap (its vmap rule).
    from torch.func import grad, vmap
    loss = RNNLoss(make_model((3, 5, 2), dtype=torch.float64), **ALL_ON)
    pred, label, states = make_inputs(loss.model, 4, 3)
    f = lambda p, l: loss(p.unsqueeze(1), l.unsqueeze(1), states)[0]  # noqa: E731
    totals, grads = vmap(f, in_dims=(1, 1))(pred, label), vmap(grad(f), in_dims=(1, 1))(pred, label)
    for b in range(pred.size(1)):
        p = pred[:, b].clone().requires_grad_(True)
        total = f(p, label[:, b])
        torch.testing.assert_close(totals[b], total.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(grads[b], torch.autograd.grad(total, p)[0], rtol=1e-12, atol=1e-15)


def test_per_sample_gradients_with_torch_func_equal_a_loop_over_samples():
    # torch.func.vmap(grad(...)): inside a transform the eager rate sums are plain operations.
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


# TorchScript's optimising executor runs, from a module's third call, a specialised graph that differentiates
# itself instead of going through autograd; torch.func's forward mode (jvp, and so jvp of grad and hessian)
# cannot see through it and gets zeros. An upstream limitation of every scripted module, documented (docs:
# design, known limits): pinned as an expected failure, strictly, so that a torch that lifts it shows here.
UPSTREAM_JVP = pytest.mark.xfail(strict=True, reason="TorchScript's optimised graph hides forward-mode AD from "
                                 "torch.func (upstream); exact under torch.jit.optimized_execution(False)")


@pytest.mark.parametrize("optimised", [True, False], ids=["default_executor", "optimized_execution_off"])
@pytest.mark.parametrize("transform", ["grad", "vjp", "jvp"])
def test_first_order_torch_func_on_the_scripted_module_equals_eager_on_every_call(transform, optimised, request):
    # grad and vjp are exact on every call; jvp only with TorchScript's optimisation off (see UPSTREAM_JVP).
    if transform == "jvp" and optimised:
        request.applymarker(UPSTREAM_JVP)
    from torch import func
    eager = RNNLoss(make_model((3, 5, 2), dtype=torch.float64), **ALL_ON)
    scripted = script_roundtrip(eager)
    pred, label, states = make_inputs(eager.model, 4, 3)
    tangent = torch.randn(states.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def derivative(loss):
        f = lambda s: loss(pred, label, s)[0]  # noqa: E731
        if transform == "grad":
            return func.grad(f)(states)
        if transform == "vjp":
            return func.vjp(f, states)[1](torch.tensor(1.0, dtype=torch.float64))[0]
        return func.jvp(f, (states,), (tangent,))[1]

    want = derivative(eager)
    with torch.jit.optimized_execution(optimised):
        for call in range(5):
            torch.testing.assert_close(derivative(scripted), want, rtol=1e-10, atol=1e-14, msg=f"call {call + 1}")
