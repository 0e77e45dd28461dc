"""Second-order gradients (Hessian-vector products, gradient penalties) of every component, eager and scripted.

Two independent checks:
- ``gradgradcheck`` in float64: finite differences of the first derivative;
- Hessian-vector products against autograd of the formulas written out naively in float64
  (``reference.formula_components``: nothing from the package), for pred, states and the three weights.

The scripted module is checked through autograd's double backward, over several calls (TorchScript's profiling
executor specialises the graph after the first ones). Higher-order torch.func transforms of a scripted module
(jvp of grad, hessian) go through TorchScript's own autodiff from the third call, a known upstream limitation:
they are tested with TorchScript's optimisation off, under which they see autograd and are exact.
"""
import pytest
import torch
from torch.func import functional_call

from cases import ALL_ON, COVERING, MISTAKES, W_KEYS, introduce, lambda_vector, lambdas_for, make_inputs, make_model, \
    script_roundtrip, subset_id
from reference import formula_components
from rnnloss import RNNLoss

INPUT_NAMES = ("pred", "states", "w_in", "w_hid", "w_out")


def _setup(active, seed=0):
    loss = RNNLoss(make_model((3, 4, 2), dtype=torch.float64, seed=seed), **lambdas_for(active))
    pred, label, states = make_inputs(loss.model, 3, 2, seed=seed + 1)  # rates in (0, 1): σ > 0, μ > 0
    weights = [dict(loss.named_parameters())[k].detach().clone() for k in W_KEYS]
    return loss, pred, label, states, weights


def hvp(total_of, inputs, vectors):
    """H·v of ``total_of(*inputs)`` w.r.t. ``inputs`` (zeros where the loss does not reach an input)."""
    total = total_of(*inputs)
    grads = torch.autograd.grad(total, inputs, create_graph=True, allow_unused=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vectors) if g is not None and g.requires_grad)
    if not torch.is_tensor(dot):
        return [torch.zeros_like(t) for t in inputs]  # linear in every input: Hessian 0
    out = torch.autograd.grad(dot, inputs, allow_unused=True)
    return [torch.zeros_like(t) if o is None else o for o, t in zip(out, inputs)]


def assert_hvp_matches(got, ref):
    # float64, ≤ 24 elements per tensor: agreement to rounding (1e-10 of the reference's scale).
    for name, a, r in zip(INPUT_NAMES, got, ref):
        scale = max(r.abs().max().item(), 1e-300)
        assert (a - r).abs().max().item() <= 1e-10 * scale + 1e-14, name


def eager_total(loss, label, mask=None):
    def f(pred, states, w_in, w_hid, w_out):
        return functional_call(loss, dict(zip(W_KEYS, (w_in, w_hid, w_out))), (pred, label, states, mask))[0]
    return f


def scripted_total(scripted, label):
    """A scripted module holds its own parameters: the weights given are copied into them, and the products are
    taken w.r.t. those parameters (returned in the weights' places)."""
    params = dict(scripted.named_parameters())

    def f(pred, states, w_in, w_hid, w_out):
        with torch.no_grad():
            for key, w in zip(W_KEYS, (w_in, w_hid, w_out)):
                params[key].copy_(w)
        return scripted(pred, label, states)[0]
    return f, [params[k] for k in W_KEYS]


def _hvp_case(active):
    loss, pred, label, states, weights = _setup(active, seed=len(active))
    inputs = [t.clone().requires_grad_(True) for t in (pred, states, *weights)]
    g = torch.Generator().manual_seed(11)
    vectors = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in inputs]
    ref = hvp(lambda *xs: formula_components(xs[0], label, xs[1], *xs[2:], lambda_vector(active)).sum(),
              inputs, vectors)
    return loss, label, inputs, vectors, ref


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
@pytest.mark.parametrize("active", COVERING, ids=subset_id)
def test_hessian_vector_product_equals_autograd_of_the_formulas(active, scripted):
    loss, label, inputs, vectors, ref = _hvp_case(active)
    if not scripted:
        assert_hvp_matches(hvp(eager_total(loss, label), inputs, vectors), ref)
        return
    module = script_roundtrip(loss)
    f, params = scripted_total(module, label)
    for _ in range(3):  # the profiling executor's first call and its specialised graph
        f(*inputs)  # copies the weights in
        assert_hvp_matches(hvp(lambda p, s, *w: f(p, s, *inputs[2:]), inputs[:2] + params, vectors), ref)


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_the_hessian_sweep_fails_for_exactly_the_sets_a_deliberate_mistake_reaches(mistake, monkeypatch):
    # A mistake in a component's value changes its Hessian too; a detached backward zeroes it.
    values, gradients = introduce(monkeypatch, mistake)
    caught = []
    for active in COVERING:
        loss, label, inputs, vectors, ref = _hvp_case(active)
        try:
            assert_hvp_matches(hvp(eager_total(loss, label), inputs, vectors), ref)
        except (AssertionError, RuntimeError):
            caught.append(active)
    assert caught == [a for a in COVERING if (values | gradients) & set(a)]


# "scripted-strided" passes the rates as a transposed view, which the scripted module reads with its sample axes
# permuted into memory order.
@pytest.mark.parametrize("scripted", [False, True, "strided"], ids=["eager", "scripted", "scripted-strided"])
@pytest.mark.parametrize("active", [(4,), (4, 5), (5, 6), (0, 4, 5, 6), tuple(range(7))], ids=subset_id)
def test_gradgradcheck_wrt_pred_states_and_weights(active, scripted):
    loss, pred, label, states, weights = _setup(active)
    if scripted == "strided":
        states = states.transpose(0, 1).contiguous()  # a (B, T, N) leaf, passed as a (T, B, N) view
    inputs = [t.clone().requires_grad_(True) for t in (pred, states)]
    if scripted == "strided":
        loss = script_roundtrip(loss)
        assert not inputs[1].transpose(0, 1).is_contiguous()
        assert torch.autograd.gradgradcheck(lambda p, s: loss(p, label, s.transpose(0, 1))[0], inputs)
    elif scripted:
        loss = script_roundtrip(loss)
        assert torch.autograd.gradgradcheck(lambda p, s: loss(p, label, s)[0], inputs)
    else:
        inputs += [w.clone().requires_grad_(True) for w in weights]
        assert torch.autograd.gradgradcheck(eager_total(loss, label), inputs)


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
def test_fr_alone_gives_a_gradient_with_a_graph(scripted):
    # A surrogate that returned a constant gradient would leave create_graph nothing to differentiate.
    loss, pred, label, states, _ = _setup((4,))
    if scripted:
        loss = script_roundtrip(loss)
    states.requires_grad_(True)
    for _ in range(3):
        (g,) = torch.autograd.grad(loss(pred, label, states)[0], states, create_graph=True)
        assert g.requires_grad
        (h,) = torch.autograd.grad(g.sum(), states)
        # d/dr of Σ 2λr/n is 2λ/n for every entry.
        torch.testing.assert_close(h, torch.full_like(states, 2 * ALL_ON["lambda_fr"] / states.numel()),
                                   rtol=1e-12, atol=0)


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["mask_per_element", "mask_per_sample"])
def test_gradient_penalty_on_the_masked_loss_matches_the_formulas(per_sample, scripted):
    loss, pred, label, states, weights = _setup(tuple(range(7)))
    shape = pred.shape[:-1] if per_sample else pred.shape
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    if scripted:
        loss = script_roundtrip(loss)
    inputs = [t.clone().requires_grad_(True) for t in (pred, states)]

    def penalty(total):
        grads = torch.autograd.grad(total, inputs, create_graph=True)
        return sum((gr ** 2).sum() for gr in grads)

    ref = torch.autograd.grad(penalty(formula_components(inputs[0], label, inputs[1], *weights,
                                                         lambda_vector(range(7)), mask=mask).sum()), inputs)
    for _ in range(3 if scripted else 1):
        got = torch.autograd.grad(penalty(loss(inputs[0], label, inputs[1], mask)[0]), inputs)
        for a, r in zip(got, ref):
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-14)


def _second_order_transforms(f, states, pred, tangent):
    """The states-by-states Hessian (flattened, or applied to ``tangent``) by every way torch.func composes."""
    from torch.func import grad, hessian, jacfwd, jacrev, jvp
    n = states.numel()
    return {"hessian": hessian(f)(states).reshape(n, n),
            "jacfwd(jacfwd)": jacfwd(jacfwd(f))(states).reshape(n, n),
            "jacrev(jacrev)": jacrev(jacrev(f))(states).reshape(n, n),
            "hessian(argnums=(pred, states))": hessian(lambda p, s: f(s, p), argnums=(0, 1))(pred, states)[1][1]
            .reshape(n, n),
            "jvp(grad)": jvp(grad(f), (states,), (tangent,))[1].reshape(n)}


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
@pytest.mark.parametrize("active", COVERING, ids=subset_id)
def test_torch_func_second_order_equals_autograd_of_the_formulas(active, scripted):
    # Every composition, several calls each. The scripted module runs with TorchScript's optimisation off, under
    # which torch.func sees autograd (docs: design, known limits): never zeros there.
    loss, pred, label, states, weights = _setup(active)
    module = script_roundtrip(loss) if scripted else loss
    tangent = torch.randn(states.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    formula = lambda s: formula_components(pred, label, s, *weights, lambda_vector(active)).sum()  # noqa: E731
    ref = torch.autograd.functional.hessian(formula, states).reshape(states.numel(), -1)
    f = lambda s, p=pred: module(p, label, s)[0]  # noqa: E731
    with torch.jit.optimized_execution(False):
        for _ in range(3):
            for name, got in _second_order_transforms(f, states, pred, tangent).items():
                want = ref @ tangent.reshape(-1) if name == "jvp(grad)" else ref
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14, msg=name)


def test_forward_mode_ad_of_the_eager_loss_equals_the_formulas():
    # torch.autograd.forward_ad (outside torch.func) runs the rate sums' own jvp rule.
    import torch.autograd.forward_ad as fwAD
    active = tuple(range(7))
    loss, pred, label, states, weights = _setup(active)
    tangent = torch.randn(states.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    formula = lambda s: formula_components(pred, label, s, *weights, lambda_vector(active)).sum()  # noqa: E731
    ref = torch.autograd.functional.jvp(formula, states, tangent)[1]
    with fwAD.dual_level():
        got = fwAD.unpack_dual(loss(pred, label, fwAD.make_dual(states, tangent))[0]).tangent
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-14)
