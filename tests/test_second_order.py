"""Second-order gradients (Hessian-vector products, gradient penalties) of every component.

Two independent checks, eager and scripted:
- ``gradgradcheck`` in float64: finite differences of the first derivative;
- Hessian-vector products against autograd of the formulas written out here in float64 (naive
  torch operations: nothing from the package), for pred, states and the three weights.
"""
import pytest
import torch
from torch.func import functional_call

from conftest import ALL_ON, ALL_SUBSETS, NAMES, lambdas_for, make_inputs, make_model, script_roundtrip
from rnnloss import RNNLoss

W_KEYS = ("model.recurrent_layer.input_layer.weight", "model.recurrent_layer.hidden_layer.weight",
          "model.readout_layer.weight")


def formula_components(pred, label, states, w_in, w_hid, w_out, lambdas, mask=None):
    """The seven components written out naively (float64), differentiable by autograd."""
    if mask is None:
        mse = ((pred - label) ** 2).mean()
    else:
        mse = (mask * (pred - label) ** 2).sum() / mask.sum()
    r = states.reshape(-1, states.shape[-1])
    means = r.mean(0)
    mu = r.mean()
    sigma = ((means - mu) ** 2).mean().sqrt()
    raw = torch.stack([mse, (w_in ** 2).mean(), (w_hid ** 2).mean(), (w_out ** 2).mean(), (r ** 2).mean(),
                       sigma, sigma / mu])
    return raw * lambdas


def _setup(active, seed=0):
    model = make_model((3, 4, 2), dtype=torch.float64, seed=seed)
    loss = RNNLoss(model, **lambdas_for(active))
    pred, label, states = make_inputs(model, 3, 2, seed=seed + 1)  # rates in (0, 1): σ > 0, μ > 0
    weights = [dict(loss.named_parameters())[k].detach().clone() for k in W_KEYS]
    return loss, pred, label, states, weights


def _total(loss, label, mask=None):
    def f(pred, states, w_in, w_hid, w_out):
        params = dict(zip(W_KEYS, (w_in, w_hid, w_out)))
        return functional_call(loss, params, (pred, label, states, mask))[0]
    return f


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
@pytest.mark.parametrize("active", ALL_SUBSETS, ids=lambda a: "+".join(NAMES[i] for i in a))
def test_hessian_vector_product_equals_autograd_of_the_formulas(active, scripted, tmp_path):
    loss, pred, label, states, weights = _setup(active, seed=len(active))
    if scripted:
        loss = script_roundtrip(loss, tmp_path)
    lambdas = torch.tensor([ALL_ON[k] if i in active else 0.0 for i, k in enumerate(ALL_ON)], dtype=torch.float64)
    inputs = [t.clone().requires_grad_(True) for t in (pred, states, *weights)]
    g = torch.Generator().manual_seed(11)
    vectors = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in inputs]

    def hvp(total):
        grads = torch.autograd.grad(total, inputs, create_graph=True, allow_unused=True)
        dot = sum((gr * v).sum() for gr, v in zip(grads, vectors) if gr is not None and gr.requires_grad)
        if not torch.is_tensor(dot):
            return [torch.zeros_like(t) for t in inputs]  # a loss linear in every input: Hessian 0
        out = torch.autograd.grad(dot, inputs, allow_unused=True)
        return [torch.zeros_like(t) if o is None else o for o, t in zip(out, inputs)]

    if scripted:
        params = dict(loss.named_parameters())
        for key, w in zip(W_KEYS, inputs[2:]):
            with torch.no_grad():
                params[key].copy_(w)
        got_total = loss(inputs[0], label, inputs[1])[0]
        # The scripted module holds its own parameters: differentiate w.r.t. them instead.
        inputs_s = inputs[:2] + [params[k] for k in W_KEYS]
        grads = torch.autograd.grad(got_total, inputs_s, create_graph=True, allow_unused=True)
        dot = sum((gr * v).sum() for gr, v in zip(grads, vectors) if gr is not None and gr.requires_grad)
        got = [torch.zeros_like(t) for t in inputs] if not torch.is_tensor(dot) else [
            torch.zeros_like(t) if o is None else o
            for o, t in zip(torch.autograd.grad(dot, inputs_s, allow_unused=True), inputs)]
    else:
        got = hvp(_total(loss, label)(*inputs))
    ref = hvp(formula_components(inputs[0], label, inputs[1], *inputs[2:], lambdas).sum())
    # float64, sizes ≤ 24 elements: agreement to rounding (rtol 1e-10 of the reference's scale).
    for name, a, r in zip(("pred", "states", "w_in", "w_hid", "w_out"), got, ref):
        scale = max(r.abs().max().item(), 1e-300)
        assert (a - r).abs().max().item() <= 1e-10 * scale + 1e-14, name


# "scripted-strided" passes the rates as a transposed view, which the scripted module reads with its
# sample axes permuted into memory order (see also test_blocked_rate_sums_... for its CUDA path).
@pytest.mark.parametrize("scripted", [False, True, "strided"], ids=["eager", "scripted", "scripted-strided"])
@pytest.mark.parametrize("active", [(4,), (4, 5), (5, 6), (0, 4, 5, 6), tuple(range(7))],
                         ids=lambda a: "+".join(NAMES[i] for i in a))
def test_gradgradcheck_wrt_pred_states_and_weights(active, scripted, tmp_path):
    loss, pred, label, states, weights = _setup(active)
    if scripted == "strided":
        states = states.transpose(0, 1).contiguous()  # a (B, T, N) leaf, passed as a (T, B, N) view
    inputs = [t.clone().requires_grad_(True) for t in (pred, states)]
    if scripted == "strided":
        loss = script_roundtrip(loss, tmp_path)
        assert not inputs[1].transpose(0, 1).is_contiguous()
        assert torch.autograd.gradgradcheck(lambda p, s: loss(p, label, s.transpose(0, 1))[0], inputs)
    elif scripted:
        loss = script_roundtrip(loss, tmp_path)
        assert torch.autograd.gradgradcheck(lambda p, s: loss(p, label, s)[0], inputs)
    else:
        inputs += [w.clone().requires_grad_(True) for w in weights]
        assert torch.autograd.gradgradcheck(_total(loss, label), inputs)


def test_fr_alone_gives_a_gradient_with_a_graph():
    # The old surrogate returned a constant gradient: create_graph then had nothing to differentiate.
    loss, pred, label, states, _ = _setup((4,))
    states.requires_grad_(True)
    (g,) = torch.autograd.grad(loss(pred, label, states)[0], states, create_graph=True)
    assert g.requires_grad
    (h,) = torch.autograd.grad(g.sum(), states)
    # d/dr of Σ 2λr/n is 2λ/n for every entry.
    torch.testing.assert_close(h, torch.full_like(states, 2 * ALL_ON["lambda_fr"] / states.numel()),
                               rtol=1e-12, atol=0)


def test_gradient_penalty_on_the_masked_loss_matches_the_formulas():
    loss, pred, label, states, weights = _setup(tuple(range(7)))
    mask = torch.rand(pred.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    inputs = [t.clone().requires_grad_(True) for t in (pred, states)]
    lambdas = torch.tensor(list(ALL_ON.values()), dtype=torch.float64)

    def penalty(total):
        grads = torch.autograd.grad(total, inputs, create_graph=True)
        return sum((gr ** 2).sum() for gr in grads)

    got = torch.autograd.grad(penalty(loss(inputs[0], label, inputs[1], mask)[0]), inputs)
    ref = torch.autograd.grad(penalty(formula_components(inputs[0], label, inputs[1], *weights, lambdas,
                                                         mask=mask).sum()), inputs)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-14)


def test_forward_mode_hessian_equals_autograd_of_the_formulas():
    # torch.func.hessian is forward-over-reverse: the rate sums' jvp and its differentiable backward.
    from torch.func import hessian
    loss, pred, label, states, weights = _setup(tuple(range(7)))
    lambdas = torch.tensor(list(ALL_ON.values()), dtype=torch.float64)
    got = hessian(lambda s: loss(pred, label, s)[0])(states)
    ref = torch.autograd.functional.hessian(
        lambda s: formula_components(pred, label, s, *weights, lambdas).sum(), states)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-14)


def test_blocked_rate_sums_taken_by_the_scripted_module_on_cuda_are_exact_to_second_order():
    # TorchScript on CUDA (and for inf/NaN rates) takes the sums as Σ b·b and column sums on blocks
    # of 2^20 rates. N_hid = 2^19 makes a block 2 rows, so 3 rows give two blocks and split's
    # backward joins them. Reference: autograd of the sums written out, float64; the result is a
    # few sums of 1.5 M terms, so 1e-12 relative leaves room for their rounding (~1e-16 · √n).
    from rnnloss.loss import _blocked_rate_sums

    g = torch.Generator().manual_seed(5)
    states = torch.rand(3, 1, 2 ** 19, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2 ** 19, generator=g, dtype=torch.float64)
    vector = torch.randn(states.shape, generator=g, dtype=torch.float64)

    def hvp(sums_of):
        sumsq, colsum = sums_of(states)
        f = 0.3 * sumsq + (weights * colsum * colsum).sum() + sumsq * colsum.sum()
        (grad,) = torch.autograd.grad(f, states, create_graph=True)
        (out,) = torch.autograd.grad((grad * vector).sum(), states)
        return out

    got = hvp(lambda s: _blocked_rate_sums(s, True, True, False))
    want = hvp(lambda s: ((s * s).sum(), s.sum(dim=(0, 1))))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
