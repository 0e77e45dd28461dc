"""The rate-sum engine (rnnloss.ratesums): Σr² and the per-neuron sums on every path (eager Function, the
TorchScript surrogate, plain operations), their gradients, and the memory their GPU recipe may use."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cases import ALL_ON, make_inputs, make_model, script_roundtrip
from rnnloss import RNNLoss
from rnnloss import ratesums


def _written_out(states):
    """Σr² and the per-neuron sums of (…, N) rates, float64, as plain operations (the reference)."""
    r = states.double().reshape(-1, states.size(-1))
    return (r * r).sum(), r.sum(0)


@pytest.mark.parametrize("path", ["sums", "plain", "plain_exporting", "scripted_surrogate", "eager_function"])
@pytest.mark.parametrize("layout", ["contiguous", "batch_first_view", "neuron_slice"])
@pytest.mark.parametrize("need_sq, need_col", [(True, True), (True, False), (False, True)], ids=["both", "sq", "col"])
def test_every_path_gives_the_float64_sums_it_was_asked_for(path, layout, need_sq, need_col):
    # 2100 samples of 33 neurons: several groups of 1024 rows and a remainder. float64 rates: each path
    # equals the written-out sums to rounding (1e-12 relative; the sums have 7e4 terms).
    g = torch.Generator().manual_seed(1)
    base = torch.rand(70, 30, 40, generator=g, dtype=torch.float64)
    states = {"contiguous": base[..., :33].contiguous(), "batch_first_view": base[..., :33].transpose(0, 1),
              "neuron_slice": base[..., :33]}[layout]
    fn = {"sums": ratesums.sums,
          "plain": lambda s, a, b: ratesums.plain_sums(s, a, b, False),
          "plain_exporting": lambda s, a, b: ratesums.plain_sums(s, a, b, True),
          "scripted_surrogate": ratesums._scripted_sums,
          "eager_function": ratesums.rate_sums}[path]
    sq, col = fn(states, need_sq, need_col)
    ref_sq, ref_col = _written_out(states)
    assert sq.dtype == torch.float64 and col.dtype == torch.float64
    if need_sq:
        assert sq.item() == pytest.approx(ref_sq.item(), rel=1e-12)
    else:
        assert sq.item() == 0.0
    if need_col:
        torch.testing.assert_close(col, ref_col, rtol=1e-12, atol=0)
    else:
        assert col.shape == () and col.item() == 0.0


def test_rows_of_reads_a_transposed_layout_as_a_view():
    base = torch.rand(4, 6, 5)
    view = base.transpose(0, 1)
    rows = ratesums.rows_of(view)
    assert rows.shape == (24, 5) and rows.data_ptr() == base.data_ptr() and rows.is_contiguous()


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_blocked_rate_sums_match_the_formula_and_its_gradient(layout):
    # 300·40·64 = 768k rates: the per-row and per-block sums; the gradient from the one-pass backward.
    loss = RNNLoss(make_model((1, 64, 1), dtype=torch.float64), lambda_mse=0.0, lambda_fr=0.5)
    base = torch.rand(300, 40, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    states = (base if layout == "contiguous" else base.transpose(0, 1)).requires_grad_(True)
    zeros = torch.zeros(1, 1, 1, dtype=torch.float64)
    total, comps = loss(zeros, zeros, states)
    total.backward()
    n = states.numel()
    assert comps[4].item() == pytest.approx(0.5 * (base ** 2).sum().item() / n, rel=1e-12)
    torch.testing.assert_close(states.grad, 0.5 * 2 * states.detach() / n, rtol=1e-12, atol=0)
    with torch.no_grad():
        assert loss(zeros, zeros, states)[1][4].item() == comps[4].item()  # no-grad value identical


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_scripted_rate_statistics_equal_eager_to_the_bit_on_the_cpu(grad, dtype):
    # The scripted module takes the eager forward's own sums (and, with a gradient wanted, adds an exact zero
    # carrying the graph). 2.4 M rates over 512 neurons: several of the sums' 2^20-rate blocks.
    model = make_model((3, 512, 2), dtype=dtype)
    eager = RNNLoss(model, **ALL_ON)
    scripted = script_roundtrip(eager)
    pred, label, states = make_inputs(model, 600, 8, seed=3)
    states.requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        comps_e, comps_s = eager(pred, label, states)[1], scripted(pred, label, states)[1]
    assert comps_s.requires_grad == grad
    assert torch.equal(comps_e[4:], comps_s[4:]), (comps_e[4:], comps_s[4:])


@pytest.mark.parametrize("path", ["scripted_surrogate", "eager_function"])
def test_blocked_sums_are_exact_to_second_order(path):
    # N_hid = 2^19 makes a CPU block 2 rows, so 3 rows give two blocks. Reference: autograd of the sums written
    # out, float64; the results are sums of 1.5 M terms, so 1e-12 relative leaves room for their rounding.
    fn = ratesums._scripted_sums if path == "scripted_surrogate" else ratesums.rate_sums
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

    torch.testing.assert_close(hvp(lambda s: fn(s, True, True)), hvp(lambda s: _written_out(s)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "scripted"])
def test_fr_gradient_stays_finite_when_the_float32_sum_of_squares_overflows(scripted):
    # r = 1e20: r² overflows float32, so fr is inf, but the formula's gradient 2λr/n is finite.
    loss = RNNLoss(make_model((1, 4, 1)), lambda_mse=0.0, lambda_fr=0.5)
    if scripted:
        loss = script_roundtrip(loss)
    states = torch.full((3, 2, 4), 1e20, requires_grad=True)
    zeros = torch.zeros(1, 1, 1)
    _, comps = loss(zeros, zeros, states)
    assert comps[4].item() == float("inf")
    (grad,) = torch.autograd.grad(comps[4], states)
    torch.testing.assert_close(grad, torch.full_like(states, 0.5 * 2 * 1e20 / states.numel()), rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", ["fr", "fr_sd"])
def test_scripted_with_gradients_gives_eager_values_where_a_float32_sum_overflows(case):
    # fr: every rate 9e18, so fr = 8.1e37 fits float32 but Σr² over the 256 rates does not.
    # fr_sd: neuron means 1e33 and 2e33 (σ = 5e32) over 2^19 + 1 samples: float32 column sums over all
    # samples overflow.
    if case == "fr":
        loss = RNNLoss(make_model((1, 4, 1)), lambda_mse=0.0, lambda_fr=1.0)
        states, index, want = torch.full((64, 4), 9e18), 4, 9e18 ** 2
    else:
        loss = RNNLoss(make_model((1, 2, 1)), lambda_mse=0.0, lambda_fr_sd=1.0)
        states, index, want = torch.tensor([1e33, 2e33]).repeat(2 ** 19 + 1, 1), 5, 5e32
    scripted = script_roundtrip(loss)
    zeros = torch.zeros(1, 1, 1)
    states.requires_grad_(True)
    got_e, got_s = loss(zeros, zeros, states)[1][index], scripted(zeros, zeros, states)[1][index]
    assert got_e.item() == pytest.approx(want, rel=1e-6)  # float32 rounding of the inputs and result
    assert got_s.item() == got_e.item()
    (grad_e,), (grad_s,) = torch.autograd.grad(got_e, states), torch.autograd.grad(got_s, states)
    assert torch.isfinite(grad_s).all()
    torch.testing.assert_close(grad_s, grad_e, rtol=1e-5, atol=0)


# ---- the GPU recipe's memory, on the meta device (which takes it, and computes shapes only)

class _Allocations(TorchDispatchMode):
    """Records every tensor an operation allocates (views excluded): (bytes, op name)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.seen.append((t.numel() * t.element_size(), str(func)))
        return out


_META_LAYOUTS = {
    "time_first": lambda dt: torch.empty(500, 256, 1024, dtype=dt, device="meta"),
    "batch_first_view": lambda dt: torch.empty(256, 500, 1024, dtype=dt, device="meta").transpose(0, 1),
    "few_samples_many_neurons": lambda dt: torch.empty(2000, 1, 65536, dtype=dt, device="meta"),
    "two_neurons": lambda dt: torch.empty(1 << 26, 1, 2, dtype=dt, device="meta"),
    "neuron_subset_of_one_sequence": lambda dt: torch.empty(1, 100000, 1024, dtype=dt, device="meta")[..., :512],
    "neuron_major_buffer": lambda dt: torch.empty(16, 1 << 22, dtype=dt, device="meta").t().unsqueeze(1),
    "64_samples_of_4m_neurons": lambda dt: torch.empty(64, 1 << 22, dtype=dt, device="meta"),
}


_COPIED = ("neuron_subset_of_one_sequence", "neuron_major_buffer")  # no view reads them as (samples, N) rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", list(_META_LAYOUTS))
def test_gpu_recipe_reads_narrow_rates_whole_and_bounds_every_temporary(dtype, layout):
    # Off the CPU the rates are taken in few, large blocks (a kernel launch costs about as much as reading
    # 2^24 rates): float32/16 rates in one pass of row norms where the float64 norms (8 bytes a sample) stay
    # within 1/8 of the rates (16 float32 neurons, 32 float16), else and for float64 in blocks of 2^24 rates.
    # No temporary but the one copy of rates that no view can read (a neuron subset, a neuron-major buffer)
    # may grow with the whole tensor: each stays within 1/8 of the rates or a float64 block of 2^24 rates.
    states = _META_LAYOUTS[layout](dtype)
    with _Allocations() as spy:
        sumsq, colsum = ratesums.sums(states, True, True)
    assert sumsq.shape == () and colsum.shape == (states.size(-1),) and colsum.dtype == torch.float64
    norms = [op for _, op in spy.seen if "linalg_vector_norm" in op]
    if dtype == torch.float64:
        assert norms == [] and all(b <= 8 << 24 for b, op in spy.seen if op.startswith("aten.mul"))
    elif states.size(-1) * states.element_size() >= 64:
        assert len(norms) == 1  # one read of every rate, however many there are
    rates = states.numel() * states.element_size()
    copied = [b for b, op in spy.seen if op.startswith(("aten.clone", "aten._unsafe_view", "aten.view"))
              or op == "aten.reshape.default"]
    others = [(b, op) for b, op in spy.seen if b not in copied or b != rates]
    assert len([b for b in copied if b == rates]) <= (1 if layout in _COPIED else 0), (layout, spy.seen)
    largest, op = max(others)
    assert largest <= max(rates // 8, 8 << 24), (largest, op, rates)
