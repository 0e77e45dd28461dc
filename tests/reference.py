"""Independent float64 references: the formulas of the loss and the CTRNN (docs/design.md), written
out with NumPy and math.fsum (values) or as naive torch float64 operations (for autograd: gradients and
second order).

Nothing here imports rnnloss: these are the formulas as stated, not the package's code.
"""
import math

import numpy as np
import torch

NAMES = ("mse", "in", "hid", "out", "fr", "fr_sd", "fr_cv")


def f64(t):
    return np.asarray(t.detach().cpu().double().numpy() if hasattr(t, "detach") else t, dtype=np.float64)


def mean_of_squares(a):
    a = f64(a).ravel()
    return math.fsum(float(v) * float(v) for v in a) / a.size


def weighted_mse(pred, label, mask=None):
    """Σ w·(pred − label)² / Σ w (0 when Σ w = 0); a mask shaped like pred without its last axis weighs
    every output of its sample. Without a mask: the plain mean."""
    p, y = f64(pred), f64(label)
    e2 = (p - y) ** 2
    if mask is None:
        return math.fsum(e2.ravel()) / p.size
    w = f64(mask)
    if w.ndim < p.ndim:
        w = np.broadcast_to(w[..., None], p.shape)
    den = math.fsum(w.ravel())
    return 0.0 if den == 0 else math.fsum((w * e2).ravel()) / den


def loss_components(pred, label, states, w_in, w_hid, w_out, lambdas, mask=None):
    """The seven λ-weighted components as a list of Python floats."""
    p, y = f64(pred), f64(label)
    assert p.shape == y.shape
    w_in, w_hid, w_out = f64(w_in), f64(w_hid), f64(w_out)
    n_hid, n_in = w_in.shape
    n_out = w_out.shape[0]
    raw = [0.0] * 7
    raw[0] = weighted_mse(p, y, mask)
    raw[1] = math.fsum((w_in ** 2).ravel()) / (n_in * n_hid)
    raw[2] = math.fsum((w_hid ** 2).ravel()) / (n_hid * n_hid)
    raw[3] = math.fsum((w_out ** 2).ravel()) / (n_out * n_hid)
    if states is not None:
        r = f64(states).reshape(-1, n_hid)
        m = r.shape[0]
        raw[4] = math.fsum((r ** 2).ravel()) / r.size
        rbar = [math.fsum(r[:, i]) / m for i in range(n_hid)]
        mu = math.fsum(r.ravel()) / r.size  # the mean of all rates
        sigma = math.sqrt(math.fsum((x - mu) ** 2 for x in rbar) / n_hid)
        raw[5] = sigma
        if sigma == 0.0:
            raw[6] = 0.0
        elif mu == 0.0:
            raw[6] = math.inf
        else:
            raw[6] = sigma / mu
    lam = [float(v) for v in lambdas]
    return [l * v if l != 0.0 else 0.0 for l, v in zip(lam, raw)]


def formula_components(pred, label, states, w_in, w_hid, w_out, lambdas, mask=None):
    """The seven λ-weighted components written out naively in torch (float64 in, float64 out), so that
    autograd differentiates the formulas themselves, to any order."""
    if mask is None:
        mse = ((pred - label) ** 2).mean()
    else:
        w = mask if mask.dim() == pred.dim() else mask.unsqueeze(-1).expand(pred.shape)
        mse = (w * (pred - label) ** 2).sum() / w.sum()
    r = states.reshape(-1, states.shape[-1])
    means = r.mean(0)
    mu = r.mean()
    sigma = ((means - mu) ** 2).mean().sqrt()
    raw = torch.stack([mse, (w_in ** 2).mean(), (w_hid ** 2).mean(), (w_out ** 2).mean(), (r ** 2).mean(),
                       sigma, sigma / mu])
    return raw * lambdas


def activation(name, v):
    if name == "relu":
        return np.maximum(v, 0.0)
    if name == "tanh":
        return np.tanh(v)
    if name == "sigmoid":
        return 1.0 / (1.0 + np.exp(-v))
    if name == "softplus":
        return np.log1p(np.exp(v))
    if name == "retanh":
        return np.maximum(np.tanh(v), 0.0)
    raise ValueError(name)


def ctrnn_run(x, w_in, b_in, w_hid, b_hid, w_out, b_out, alpha, act, v0=None):
    """Step-by-step §4 dynamics, time first: x (T, B, N_in) -> output (T, B, N_out), states (T, B, N_hid)."""
    x = f64(x)
    w_in, w_hid, w_out = f64(w_in), f64(w_hid), f64(w_out)
    b_in, b_hid, b_out = (np.zeros(w.shape[0]) if b is None else f64(b) for b, w in ((b_in, w_in), (b_hid, w_hid), (b_out, w_out)))
    steps, batch = x.shape[:2]
    v = np.zeros((batch, w_hid.shape[0])) if v0 is None else f64(v0)
    r = activation(act, v)
    states, outputs = [], []
    for t in range(steps):
        v = (1 - alpha) * v + alpha * (r @ w_hid.T + b_hid + x[t] @ w_in.T + b_in)
        r = activation(act, v)
        states.append(r)
        outputs.append(r @ w_out.T + b_out)
    return np.stack(outputs), np.stack(states)


def _sd_cv(means):
    mu = means.mean()
    sd = math.sqrt(((means - mu) ** 2).mean())
    return sd, sd / mu


def float64_statistics(pred, label, states):
    """mse, fr, fr_sd, fr_cv (λ = 1) of float32 inputs in float64 — NumPy's pairwise sums, fast
    enough for 10^7 elements and accurate to ~1e-15 — and the float32 floors of fr_sd and fr_cv:
    their relative change when the exact per-neuron means are rounded once to float32."""
    p, y, r = f64(pred), f64(label), f64(states)
    r = r.reshape(-1, r.shape[-1])
    means = r.sum(axis=0) / r.shape[0]
    sd, cv = _sd_cv(means)
    sd32, cv32 = _sd_cv(means.astype(np.float32).astype(np.float64))
    return {"mse": float(((p - y) ** 2).sum() / p.size), "fr": float((r * r).sum() / r.size),
            "fr_sd": sd, "fr_cv": cv, "floor_sd": abs(sd32 - sd) / sd, "floor_cv": abs(cv32 - cv) / abs(cv)}


def assert_meets_accuracy_bound(components, ref, who):
    """The contract's accuracy bound on the rate terms and mse of ``components`` (λ = 1, any device) against
    :func:`float64_statistics` ``ref``: mse and fr within 1e-5 relative, fr_sd and fr_cv within
    max(1e-5, 4 × their float32 floor)."""
    bounds = {"mse": 1e-5, "fr": 1e-5, "fr_sd": max(1e-5, 4 * ref["floor_sd"]), "fr_cv": max(1e-5, 4 * ref["floor_cv"])}
    got = components.detach().double().cpu()
    for name, index in (("mse", 0), ("fr", 4), ("fr_sd", 5), ("fr_cv", 6)):
        err = abs(got[index].item() - ref[name]) / abs(ref[name])
        assert err <= bounds[name], f"{who} {name}: relative error {err:.2e} > {bounds[name]:.2e}"
