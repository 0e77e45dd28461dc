"""The rate-sum engine (rnnloss.ratesums): Σr² and the per-neuron sums on every path (eager Function, the
TorchScript surrogate, plain operations, the Triton kernel), their gradients, and the memory their GPU recipe may
use."""
import importlib.util
import json
import subprocess
import sys
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cases import ALL_ON, CUDA, child_env, make_inputs, make_model, script_roundtrip
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


# ---- the Triton kernel of the eager CUDA forward (rnnloss.triton_sums): on the CPU under Triton's interpreter

_KERNEL_CHECK = r"""
import json, sys
import torch
from rnnloss.triton_sums import BLOCK_S, MAX_STRIP, fused_sums
device = sys.argv[1]
g = torch.Generator().manual_seed(2)
base = torch.rand(70, 30, 40, generator=g) * 4 - 1  # mixed signs: column sums cancel
exact = torch.zeros(MAX_STRIP, 2)  # each tile's float32 sum exact; 2^24 + 15 needs the float64 between tiles
exact[0], exact[BLOCK_S::BLOCK_S] = 2.0 ** 24, 1.0
nonfinite = torch.rand(600, 5, generator=g)
nonfinite[7, 0], nonfinite[550, 1], nonfinite[3, 2], nonfinite[9, 2] = float("inf"), float("nan"), float("inf"), -float("inf")
cases = {  # (samples, N) rows as the engine hands them over; blocks of 128 neurons
    "contiguous": base[..., :33].reshape(-1, 33),
    "neuron_slice": base.reshape(-1, 40)[:, :33],
    "neuron_major": base.reshape(-1, 40)[:300].t(),
    "one_rate": base[:1, :1, 0].reshape(1, 1),
    "one_neuron": base[..., :1].reshape(-1, 1),
    "130_neurons_1100_samples": torch.rand(1100, 130, generator=g) * 4 - 1,
    "float16": base.reshape(-1, 40).half(),
    "bfloat16": base.reshape(-1, 40).bfloat16(),
    "float64": base.reshape(-1, 40).double(),
    "equal_neurons": base[..., :1].expand(70, 30, 7).reshape(-1, 7),
    "exact": exact,
    "nonfinite": nonfinite,
}
out = {}
for strip in (None, BLOCK_S, MAX_STRIP):  # the default, one tile a strip, the longest strips
    for name, rows in cases.items():
        for need_sq, need_col in ((True, True), (True, False), (False, True)):
            sq, col = fused_sums(rows.to(device), need_sq, need_col, strip)
            sq, col, r = sq.cpu(), col.cpu(), rows.double()
            u = 2.0 ** -53 if rows.dtype == torch.float64 else 2.0 ** -24
            assert sq.dtype == col.dtype == torch.float64 and sq.shape == ()
            assert col.shape == ((rows.size(1),) if need_col else ())
            key = f"{name}, strip {strip}, sq {need_sq}, col {need_col}"
            bound = 0.0 if name == "exact" else 1.0
            if need_sq:
                want = (r * r).sum()
                if torch.isfinite(want):
                    out[key + ": sq"] = [abs(sq.item() - want.item()), bound * (BLOCK_S + 1) * u * want.item()]
                else:
                    out[key + ": sq"] = [0.0 if torch.equal(sq, want) or (sq.isnan() and want.isnan()) else 1.0, 0.0]
            else:
                assert sq.item() == 0.0
            if need_col:
                want, finite = r.sum(0), torch.isfinite(r.sum(0))
                err = ((col - want).abs() - bound * BLOCK_S * u * r.abs().sum(0))[finite]
                same = torch.equal(col[~finite].isnan(), want[~finite].isnan()) and \
                    torch.equal(col[~finite].nan_to_num(), want[~finite].nan_to_num())
                out[key + ": col"] = [max(err.max().item(), 0.0) if same else 1.0, 0.0]
            else:
                assert col.item() == 0.0
        if name == "equal_neurons":
            assert torch.unique(fused_sums(rows.to(device), False, True, strip)[1]).numel() == 1
print(json.dumps(out))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="needs Triton (pinned in requirements/test.txt; a CPU build of torch does not bring it)")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])],
                         ids=["cpu_interpreter", "cuda"])
def test_the_triton_kernel_reads_every_layout_and_dtype_within_its_rounding_bound(device):
    # Each tile sums at most BLOCK_S terms in the accumulation dtype (any order: at most BLOCK_S - 1 roundings,
    # plus one for a square), everything after is float64: |error| ≤ BLOCK_S·u·Σ|r| per column and
    # ≤ (BLOCK_S + 1)·u·Σr² for Σr²; 0 for the "exact" case, whose sums need float64 between tiles. A row or
    # neuron lost or read twice is off by a whole rate, far beyond that. inf and NaN land where float64 puts them.
    # The kernel is chosen at import, so a child process: the interpreter on the CPU, the GPU otherwise.
    env = child_env(**({"TRITON_INTERPRET": "1"} if device == "cpu" else {}))
    done = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", _KERNEL_CHECK, device], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result) == 3 * 12 * 4
    for case, (err, bound) in result.items():
        assert err <= bound, (case, err, bound)


def test_a_failing_kernel_warns_once_and_the_stock_operators_take_over(monkeypatch):
    # Triton compiles its launcher with a C compiler and caches kernels on disk: where that fails, the loss
    # keeps working. On the CPU the kernel is never chosen, so a stand-in that fails as a launch would.
    def launch_fails(rows, need_sq, need_col):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(ratesums, "FUSED_ON_CUDA", True)
    monkeypatch.setattr(ratesums, "_fused_kernel", lambda s: launch_fails if ratesums.FUSED_ON_CUDA else None)
    states = torch.rand(6, 3, 5, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"Triton kernel of the rate sums failed \(RuntimeError: Failed to find C"):
        sq, col = ratesums.rate_sums(states, True, True)
    assert ratesums.FUSED_ON_CUDA is False
    ref_sq, ref_col = _written_out(states)
    assert sq.item() == pytest.approx(ref_sq.item(), rel=1e-12)
    torch.testing.assert_close(col, ref_col, rtol=1e-12, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ratesums.rate_sums(states, True, True)  # once: no second warning


@pytest.mark.cuda
@CUDA
def test_the_eager_cuda_forward_takes_the_triton_kernel_where_triton_imports():
    states = torch.rand(40, 8, 64, device="cuda")
    expected = importlib.util.find_spec("triton") is not None and torch.cuda.get_device_capability()[0] >= 7
    assert (ratesums._fused_kernel(states) is not None) == expected
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither a failed kernel nor Triton's own notices
        sq, col = ratesums.rate_sums(states, True, True)
    assert ratesums.FUSED_ON_CUDA
    ref_sq, ref_col = _written_out(states.cpu())
    assert sq.item() == pytest.approx(ref_sq.item(), rel=1e-6)  # within the kernel's and sums' rounding bounds
    torch.testing.assert_close(col.cpu(), ref_col, rtol=1e-6, atol=1e-6)
