"""The parity tolerances (rnnloss.parity): loose enough that no valid config fails from float32
noise, tight enough that a runtime with a formula or axis mistake fails."""
import io
import json
import math

import pytest
import torch

from rnnloss import export, parity
from rnnloss.config import validate

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
    return export.build(validate({"model": {"dims": [3, 32, 2]}, "loss": ALL_RATES, "mask": True}))


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_runtime_with_a_formula_or_axis_mistake_fails_parity(eager, mistake):
    def wrong_runtime(pred, label, states, mask):
        total, comps = eager(pred, label, states, mask)
        comps = MISTAKES[mistake](pred, label, states, mask, comps, eager.lambdas)
        return comps.sum(), comps

    shapes = parity.fresh_shapes(6, 3)
    row = parity.Row("fake", "wrong " + mistake, "cpu")
    parity._compare_loss(row, eager, wrong_runtime, parity.trainable(eager), shapes, "cpu", eager, mask=True)
    assert not row.passed and not row.error, (row.max_rel, row.worst)
    honest = parity.Row("fake", "eager itself", "cpu")
    parity._compare_loss(honest, eager, lambda *xs: eager(*xs), parity.trainable(eager), shapes, "cpu", eager, True)
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


ODD_CONFIGS = {
    "issue_3_2_2": {"model": {"dims": [3, 2, 2]},
                    "loss": {"lambda_mse": 1, "lambda_fr": 1, "lambda_fr_sd": 1, "lambda_fr_cv": 1}},
    "one_hidden_tanh_batch_first": {"model": {"dims": [2, 1, 1], "activation": "tanh", "batch_first": True},
                                    "loss": ALL_RATES, "example": {"time": 4, "batch": 2}},
    "masked_softplus": {"model": {"dims": [4, 5, 3], "activation": "softplus"}, "loss": ALL_RATES, "mask": True,
                        "example": {"time": 7, "batch": 2}},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ODD_CONFIGS))
def test_small_and_odd_configs_pass_their_own_parity(tmp_path, name):
    table = io.StringIO()
    status = export.run(validate(ODD_CONFIGS[name]), tmp_path / "out", force=False, device="cpu", stream=table)
    assert status == 0, table.getvalue()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert ("mask" in manifest["inputs"]) == bool(ODD_CONFIGS[name].get("mask"))
