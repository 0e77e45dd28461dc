"""The parity tolerances (rnnloss.export.parity): loose enough that no valid config fails from float32
noise, tight enough that a runtime with a formula or axis mistake fails."""
import io
import json
import math

import pytest
import torch

from rnnloss.export import cli, parity
from rnnloss.export.artifacts import build, sample_inputs
from rnnloss.export.config import validate
from rnnloss.rules import FLOAT32_MAX


def inputs_for(eager, mask):
    return lambda i, t, b: sample_inputs(eager, t, b, 100 + i, mask)


def compare(row, eager, runtime, mask):
    parity.compare_loss(row, eager, runtime, parity.trainable(eager), inputs_for(eager, mask),
                        parity.fresh_shapes(6, 3))

ALL_RATES = {"lambda_mse": 1, "lambda_in": 0.1, "lambda_hid": 0.1, "lambda_out": 0.1,
             "lambda_fr": 1, "lambda_fr_sd": 1, "lambda_fr_cv": 1}


def _sd_cv(means):
    mu = means.mean()
    sd = ((means - mu) ** 2).mean().sqrt()
    return sd, sd / mu


def _replace(comps, lambdas, index_values):
    comps = comps.clone()
    lam = lambdas.to(comps.dtype)
    for i, v in index_values.items():
        comps[i] = lam[i] * v
    return comps


# Each mistake: (pred, label, states, mask, eager components, λ) -> the components a wrong runtime gives.
MISTAKES = {
    # σ with N − 1 (torch.std's default): off by sqrt(N/(N−1)), 1.6 % at N_hid = 32
    "sample_sd": lambda p, l, s, m, c, lam: _replace(c, lam, dict(zip(
        (5, 6), (x * math.sqrt(s.size(-1) / (s.size(-1) - 1)) for x in _sd_cv(s.reshape(-1, s.size(-1)).mean(0)))))),
    # per-neuron means over time only (one mean per batch entry and neuron), then σ over all of them
    "means_over_time_only": lambda p, l, s, m, c, lam: _replace(c, lam, dict(zip(
        (5, 6), _sd_cv(s.mean(0).reshape(-1))))),
    # fr as the square of the mean rate instead of the mean of squares
    "fr_square_of_mean": lambda p, l, s, m, c, lam: _replace(c, lam, {4: s.mean() ** 2}),
    # mse divided by the number of samples, not of elements (off by N_out)
    "mse_count_without_outputs": lambda p, l, s, m, c, lam: _replace(c, lam, {0: ((p - l) ** 2).sum() / p[..., 0].numel()}),
    # the mask ignored: the unweighted mean
    "mask_ignored": lambda p, l, s, m, c, lam: _replace(c, lam, {0: ((p - l) ** 2).mean()}),
}


@pytest.fixture(scope="module")
def eager():
    return build(validate({"model": {"dims": [3, 32, 2]}, "loss": ALL_RATES, "mask": True}))


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_runtime_with_a_formula_or_axis_mistake_fails_parity(eager, mistake):
    def wrong_runtime(pred, label, states, mask):
        total, comps = eager(pred, label, states, mask)
        comps = MISTAKES[mistake](pred, label, states, mask, comps, eager.lambdas)
        return comps.sum(), comps

    row = parity.Row("fake", "wrong " + mistake, "cpu")
    compare(row, eager, wrong_runtime, mask=True)
    assert not row.passed and not row.error, (row.max_rel, row.worst)
    honest = parity.Row("fake", "eager itself", "cpu")
    compare(honest, eager, lambda *xs: eager(*xs), mask=True)
    assert honest.passed and honest.worst == 0.0


def test_sd_tolerance_follows_the_conditioning_of_the_spread():
    # Rates 10 + small per-neuron offsets: σ ≪ μ, so σ from float32 sums is ill-conditioned.
    n_hid = 8
    flat = torch.full((100, 4, n_hid), 10.0) + torch.linspace(0, 1e-3, n_hid)
    spread = torch.rand(100, 4, n_hid) + torch.linspace(0, 1, n_hid)
    lambdas = torch.ones(7, dtype=torch.float64)
    comps = torch.zeros(7)
    allow_flat = parity.component_tolerances(comps, lambdas, flat, flat.numel())[5]
    allow_spread = parity.component_tolerances(comps, lambdas, spread, spread.numel())[5]
    sd_flat = flat.double().reshape(-1, n_hid).mean(0).std(unbiased=False)
    sd_spread = spread.double().reshape(-1, n_hid).mean(0).std(unbiased=False)
    base = parity.sum_rtol(flat.numel())
    assert allow_flat / sd_flat == pytest.approx(base * 10.001 / sd_flat.item(), rel=1e-3)  # κ = max m_i / σ
    assert allow_spread / sd_spread < 10 * base < allow_flat / sd_flat


# (the ExecuTorch programs of a batch-first masked model: tests/cli/test_artifacts.py)
ODD_CONFIGS = {
    "issue_3_2_2": {"model": {"dims": [3, 2, 2]}, "executorch": None,
                    "loss": {"lambda_mse": 1, "lambda_fr": 1, "lambda_fr_sd": 1, "lambda_fr_cv": 1}},
    "one_hidden_tanh_batch_first": {"model": {"dims": [2, 1, 1], "activation": "tanh", "batch_first": True},
                                    "loss": ALL_RATES, "example": {"time": 4, "batch": 2}, "executorch": None},
    "masked_softplus": {"model": {"dims": [4, 5, 3], "activation": "softplus"}, "loss": ALL_RATES, "mask": True,
                        "example": {"time": 7, "batch": 2}, "executorch": None},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ODD_CONFIGS))
def test_small_and_odd_configs_pass_their_own_parity(tmp_path, name):
    table = io.StringIO()
    status = cli.run(validate(ODD_CONFIGS[name]), tmp_path / "out", force=False, device="cpu", stream=table)
    assert status == 0, table.getvalue()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert ("mask" in manifest["inputs"]) == bool(ODD_CONFIGS[name].get("mask"))


# Overflow. Any λ up to float32's largest value is accepted, so a component or a gradient may leave float32's
# range (λ · a raw value > 1); two runtimes that both give the same infinity agree, one that gives an infinity
# or a NaN where the other has a number does not. Each case: (eager, runtime, whether they agree) as float32
# gradients compared normwise at rtol 1e-4.
INF, NAN = math.inf, math.nan
OVERFLOW_CASES = {
    "the_same_infinity": ([1.0, INF], [1.0, INF], True),
    "nan_at_the_same_entry": ([1.0, NAN], [1.0, NAN], True),
    # float32's largest value and +inf are one rounding apart (the sum rounded to either side of 2^128 − 2^103)
    "largest_float32_against_inf": ([FLOAT32_MAX], [INF], True),
    "inf_where_eager_is_finite": ([1e38], [INF], False),
    "finite_where_eager_is_inf": ([INF], [1e38], False),
    "opposite_infinities": ([-INF], [INF], False),
    "nan_where_eager_has_a_number": ([1.0, 2.0], [1.0, NAN], False),
    "a_number_where_eager_has_nan": ([1.0, NAN], [1.0, 2.0], False),
    # the norm of the comparison is that of the finite entries: an infinity elsewhere must not hide an error
    "finite_entry_off_beside_an_inf": ([1.0, INF], [2.0, INF], False),
}


@pytest.mark.parametrize("case", list(OVERFLOW_CASES))
def test_infinities_agree_only_with_the_same_infinity_and_nan_only_with_nan(case):
    ref, got, agree = OVERFLOW_CASES[case]
    row = parity.Row("fake", case, "cpu")
    try:
        row.compare_gradient(torch.tensor(got), torch.tensor(ref), 1e-4)
    except AssertionError as e:  # NaN at other entries: reported in the table as the row's error
        row.error = str(e)
    assert row.passed == agree, (row.max_abs, row.worst, row.error)


@pytest.fixture(scope="module")
def eager_at_float32_max():
    lambdas = {**ALL_RATES, "lambda_mse": FLOAT32_MAX, "lambda_fr": FLOAT32_MAX}
    return build(validate({"model": {"dims": [3, 32, 2]}, "loss": lambdas}))


# Runtimes that disagree with eager only where float32 overflows.
OVERFLOW_MISTAKES = {
    # λ · Σr² before dividing by the count: inf where λ · mean(r²) is finite
    "fr_lambda_before_the_mean": lambda p, l, s, c, lam: _replace(c, torch.ones(7), {
        4: lam[4].float() * (s * s).sum() / s.numel()}),
    # saturates at a finite value where eager overflows
    "mse_finite_where_eager_overflows": lambda p, l, s, c, lam: torch.nan_to_num(c, posinf=1e38),
    "nan_for_fr": lambda p, l, s, c, lam: _replace(c, torch.ones(7), {4: torch.tensor(math.nan)}),
}


def test_parity_at_float32_max_compares_infinities_and_passes_eager_itself(eager_at_float32_max):
    eager = eager_at_float32_max
    shapes = parity.fresh_shapes(6, 3)
    overflowed = [torch.isinf(eager(*sample_inputs(eager, t, b, 100 + i))[1][0]).item()
                  for i, (t, b) in enumerate(shapes)]
    assert any(overflowed) and not all(overflowed), overflowed  # both cases are compared below
    honest = parity.Row("fake", "eager itself", "cpu")
    compare(honest, eager, lambda *xs: eager(*xs), mask=False)
    assert honest.passed and honest.worst == 0.0, (honest.error, honest.worst)


@pytest.mark.parametrize("mistake", list(OVERFLOW_MISTAKES))
def test_a_runtime_that_overflows_differently_fails_parity(eager_at_float32_max, mistake):
    eager = eager_at_float32_max

    def wrong_runtime(pred, label, states):
        total, comps = eager(pred, label, states)
        comps = OVERFLOW_MISTAKES[mistake](pred, label, states, comps, eager.lambdas)
        return comps.sum(), comps

    row = parity.Row("fake", "wrong " + mistake, "cpu")
    parity.run_row(row, lambda r: compare(r, eager, wrong_runtime, mask=False))
    assert not row.passed, (row.max_rel, row.worst)


@pytest.mark.slow
@pytest.mark.parametrize("component", ["mse", "hid", "fr", "fr_sd", "fr_cv"])
def test_a_lambda_at_float32s_largest_value_exports_and_verifies(tmp_path, capsys, component):
    # A small model, without the ExecuTorch programs (slow to lower; tested at ordinary lambdas).
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"loss": {f"lambda_{component}": FLOAT32_MAX}, "model": {"dims": [3, 16, 2]},
                                  "example": {"time": 6, "batch": 3},
                                  "executorch": None}))
    out = tmp_path / "out"
    status = cli.main(["--config", str(config), "--out", str(out), "--device", "cpu", "--quiet"])
    assert status == 0, capsys.readouterr()
    assert json.loads((out / "manifest.json").read_text())["lambdas"][component] == FLOAT32_MAX
    assert cli.main(["--verify", str(out), "--device", "cpu", "--quiet"]) == 0, capsys.readouterr()
