"""Parity of the exported artifacts with eager mode.

Every check runs eager mode and one runtime on the same fresh inputs — shapes that differ from
the export example, batch 1 and time 1 included, which is what proves the dynamic axes — and
compares every output (and gradient) with a tolerance derived from what is compared.

Tolerances (float32). Eager and a runtime compute the same formulas on the same float32 inputs
with other reduction orders (ONNX Runtime, another device), other fusion (TorchScript) or float64
sums (the exported graphs); what they may differ by is the float32 rounding of those sums, scaled
by the conditioning of each quantity:

- :func:`sum_rtol` ``(n) = MARGIN · u · max(√n, 16)``, u = 2^-24: the relative error of a float32
  sum of n same-signed terms is ~√n·u for the usual rounding (the worst case, n·u, assumes every
  rounding goes one way); 16 covers the short chains of a few roundings (products, divisions, the
  λ multiply) on small inputs, ``MARGIN = 10`` the tail of the distribution. n is the largest
  reduction of the check (the element count of pred, states or a weight matrix); for the default
  config's largest parity input (57·13·64 ≈ 4.7·10^4 rates) it is 1.3e-4.
- :func:`component_tolerances`, per component, absolute: mse, in, hid, out and fr are sums of
  non-negative terms (condition number 1): ``sum_rtol · |value|``. fr_sd is σ of the per-neuron
  means r̄_i; each r̄_i may be off by ``sum_rtol · m_i`` (m_i = neuron i's mean |r|), and
  |δσ| ≤ max_i |δr̄_i| (Cauchy–Schwarz on δσ = Σ_i (r̄_i − μ) δr̄_i / (N σ)), so
  ``sum_rtol · λ · max_i m_i`` — relative to σ that is the condition number max_i m_i / σ
  (≥ μ/σ: a small spread under a large mean is ill-conditioned in float32). fr_cv = σ/μ adds μ's
  relative error ``sum_rtol · mean|r| / |μ|``. total: the sum of the components' allowances.
- :func:`gradient_rtol`, normwise (``max|Δg| ≤ rtol · max|g|`` per gradient tensor):
  ``sum_rtol · κ``, κ the largest condition number above among the active components (the
  gradients of fr_sd and fr_cv are built from r̄_i − μ and σ, with the same errors); a σ that is
  exactly 0 contributes nothing (the loss defines that gradient as 0).

Overflow (any λ up to float32's largest value is accepted, so a component or gradient may leave
float32's range): NaN must sit at the same entries in both (NaN against a number is a
disagreement); ±inf counts as the nearest value that rounds to it, ±(the dtype's overflow
threshold) (:func:`overflow_bound`), so two equal infinities agree, +inf against −inf or against
a finite value far from the threshold disagrees, and a finite value within its allowance of the
threshold agrees with an infinity (the two runtimes' sums rounded to either side of it). An
allowance is never derived from an infinity or a NaN: component allowances use the threshold, a
gradient's norm its finite entries. Gradients are those of ``(total + Σ components) / 2``, which
reaches every component through both outputs with weight 1, as ``total`` alone does in training
(doubling it would overflow float32 for λ above half its range where training does not).

A formula or axis mistake (sample SD instead of population SD, means over the wrong axis, a wrong
count) changes a component by 1e-2 or more, far above ``sum_rtol · κ`` unless κ is huge, and
tests/runtimes/test_parity.py checks that such mistakes fail.
"""
import dataclasses
import io
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

UNIT_ROUNDOFF = 2.0 ** -24
MARGIN = 10.0


def sum_rtol(n: int) -> float:
    """Relative error allowed for a float32 quantity whose largest sum has ``n`` terms."""
    return MARGIN * UNIT_ROUNDOFF * max(math.sqrt(n), 16.0)


def overflow_bound(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float64 on the CPU with ±inf replaced by ±(the smallest magnitude that rounds to inf
    in ``t``'s dtype): for float32 2^128 − 2^103, halfway between its largest value and 2^128
    (float64's own largest value for float64, whose threshold is not a float64). NaN stays NaN."""
    x = t.detach().double().cpu()
    info = torch.finfo(t.dtype)
    bound = info.max + info.max / (2.0 - info.eps) * info.eps / 2.0  # + half the spacing at the top
    bound = bound if math.isfinite(bound) else info.max
    return torch.where(torch.isinf(x), torch.copysign(torch.full_like(x, bound), x), x)


def _rate_scales(states: torch.Tensor) -> Tuple[float, float, float, float]:
    """max_i m_i, mean |r|, σ and μ of ``states`` (…, N_hid), in float64."""
    r = states.detach().double().cpu().reshape(-1, states.size(-1))
    means = r.mean(0)
    mu = means.mean()
    sigma = ((means - mu) ** 2).mean().sqrt()
    return r.abs().mean(0).max().item(), r.abs().mean().item(), sigma.item(), mu.item()


def component_tolerances(components: torch.Tensor, lambdas: torch.Tensor, states: Optional[torch.Tensor],
                         n: int) -> torch.Tensor:
    """Absolute allowed error of each of the 7 components (see the module docstring)."""
    base = sum_rtol(n)
    c = overflow_bound(components).abs()
    allowed = base * c
    if states is not None:
        lam = lambdas.detach().double().cpu()
        m_max, m_all, sigma, mu = _rate_scales(states)
        d_sigma = base * m_max
        allowed[5] = lam[5] * d_sigma
        if mu != 0:
            allowed[6] = lam[6] * (d_sigma + sigma * base * m_all / abs(mu)) / abs(mu)
    return allowed


def gradient_rtol(active: Sequence[str], states: Optional[torch.Tensor], n: int) -> float:
    """Normwise relative error allowed for a gradient (see the module docstring)."""
    kappa = 1.0
    if states is not None and ("fr_sd" in active or "fr_cv" in active):
        m_max, m_all, sigma, mu = _rate_scales(states)
        if sigma > 0:
            kappa = max(kappa, m_max / sigma)
            if "fr_cv" in active:
                kappa = max(kappa, m_max / sigma + (m_all / abs(mu) if mu != 0 else math.inf))
    return sum_rtol(n) * kappa


@dataclasses.dataclass
class Row:
    """One artifact × runtime × device check: its largest errors and whether each was allowed.

    ``max_rel`` is normwise (max |runtime − eager| / max |eager| over one tensor), for the table;
    ``worst`` is the largest error / allowance over every compared entry (pass: ≤ 1), ``rtol`` the
    relative allowance of the entry that set ``worst``.
    """
    artifact: str
    runtime: str
    device: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    worst: float = 0.0
    rtol: float = 0.0
    exceeded: bool = False
    checked: str = ""
    error: str = ""

    @property
    def passed(self) -> bool:
        return not self.error and not self.exceeded

    def why(self) -> str:
        """What failed, as the quantity that failed: the error, or the largest error / allowance."""
        return self.error or f"an entry off by {self.worst:.3g} x its allowance (rtol {self.rtol:.2g})"

    def update(self, got: torch.Tensor, ref: torch.Tensor, allowed) -> None:
        """Compare ``got`` with ``ref`` entry by entry; ``allowed`` is the absolute allowance
        (a tensor like ``ref`` or a number). NaN must be at the same entries in both; an infinity
        is compared as its dtype's overflow threshold (:func:`overflow_bound`)."""
        if got.shape != ref.shape:
            raise AssertionError(f"shape {list(got.shape)} != eager {list(ref.shape)}")
        got, ref = overflow_bound(got), overflow_bound(ref)
        compared = ~torch.isnan(ref)
        if not torch.equal(~torch.isnan(got), compared):
            raise AssertionError("NaN entries differ from eager")
        allowed = torch.as_tensor(allowed, dtype=torch.float64).expand_as(ref)[compared]
        diff = (got[compared] - ref[compared]).abs()
        if diff.numel() == 0:
            return
        scale = ref[compared].abs().max().item()
        self.max_abs = max(self.max_abs, diff.max().item())
        self.max_rel = max(self.max_rel, diff.max().item() / scale if scale > 0 else
                           (0.0 if diff.max().item() == 0 else math.inf))
        self.exceeded = self.exceeded or bool((diff > allowed).any())
        ratio = torch.where(allowed > 0, diff / allowed, torch.where(diff > 0, math.inf, 0.0))
        k = int(ratio.argmax())
        if ratio[k].item() >= self.worst:
            self.worst = ratio[k].item()
            value = ref[compared][k].abs().item()
            self.rtol = allowed[k].item() / value if value > 0 else allowed[k].item()

    def compare_loss(self, got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor], lambdas, states, n) -> None:
        """(total, components) of a runtime against eager's, with the per-component allowances."""
        allowed = component_tolerances(ref[1], lambdas, states, n)
        self.update(got[1], ref[1], allowed)
        self.update(got[0], ref[0], allowed.sum() + sum_rtol(n) * overflow_bound(ref[0]).abs())

    def compare_gradient(self, got: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
        """Normwise: every entry within ``rtol`` · the largest finite |entry| of ``ref``."""
        finite = ref.detach().double()
        finite = finite[torch.isfinite(finite)]
        scale = finite.abs().max().item() if finite.numel() else 0.0
        self.update(got, ref, rtol * scale)

    def as_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["passed"] = self.passed
        return d


def fresh_shapes(time: int, batch: int) -> List[Tuple[int, int]]:
    """(time, batch) pairs that differ from the export example, batch 1 and time 1 among them."""
    shapes = [(1, 1), (time + 3, 1), (1, batch + 2), (time + 7, batch + 5)]
    return [s for s in shapes if s != (time, batch)]


def weights(loss) -> List[torch.Tensor]:
    """W_in, W_hid, W_out: the weight penalties' sums, which may be the check's largest."""
    m = loss.model
    return [m.recurrent_layer.input_layer.weight, m.recurrent_layer.hidden_layer.weight, m.readout_layer.weight]


def trainable(module) -> Dict[str, torch.Tensor]:
    """The parameters that receive gradients (nn4n's fixed zero biases and init state do not)."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def outputs_and_grads(fn: Callable, params: Dict[str, torch.Tensor], inputs: Sequence[torch.Tensor], grads: bool):
    """(total, components) of ``fn(pred, label, states[, mask])`` and, with ``grads``, the gradients of
    (total + Σ components) / 2 w.r.t. pred, states and ``params`` (the halves: see the module docstring)."""
    pred = inputs[0].detach().clone().requires_grad_(grads)
    states = inputs[2].detach().clone().requires_grad_(grads)
    with torch.set_grad_enabled(grads):
        total, comps = fn(pred, inputs[1], states, *inputs[3:])
    if not grads:
        return [total, comps], {}
    wanted = [pred, states] + list(params.values())
    got = torch.autograd.grad(0.5 * total + 0.5 * comps.sum(), wanted, allow_unused=True)
    return [total, comps], dict(zip(["d_pred", "d_states"] + [f"d_{k}" for k in params], got))


def compare_loss(row: Row, eager, runtime: Callable, runtime_params: Optional[Dict[str, torch.Tensor]],
                 inputs_for: Callable[[int, int, int], Sequence[torch.Tensor]], shapes) -> None:
    """Values — and gradients w.r.t. pred, states and every trainable parameter when ``runtime_params`` is
    given — of ``runtime(pred, label, states[, mask])`` against ``eager`` on ``inputs_for(i, time, batch)``."""
    grads = runtime_params is not None
    for i, (t, b) in enumerate(shapes):
        inputs = inputs_for(i, t, b)
        n = max([inputs[0].numel(), inputs[2].numel()] + [w.numel() for w in weights(eager)])
        ref, ref_g = outputs_and_grads(eager, trainable(eager), inputs, grads)
        got, got_g = outputs_and_grads(runtime, runtime_params or {}, inputs, grads)
        rtol = gradient_rtol(eager.active, inputs[2], n)
        for key, g in ref_g.items():
            if (g is None) != (got_g.get(key) is None):
                raise AssertionError(f"gradient {key} present in only one of eager and runtime")
            if g is not None:
                row.compare_gradient(got_g[key], g, rtol)
        row.compare_loss(got, ref, eager.lambdas, inputs[2], n)
    row.checked = f"{len(shapes)} shapes (T,B) {shapes}, values" + (" + gradients" if grads else "")


def is_out_of_memory(e: BaseException) -> bool:
    """MemoryError, or torch's allocator failing (CUDA: OutOfMemoryError; CPU: a RuntimeError)."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e))


def run_row(row: Row, body: Callable[[Row], None]) -> Row:
    """``body(row)``; a failure to load or run is the row's error (out of memory is the caller's: exit 2)."""
    try:
        body(row)
    except Exception as e:  # noqa: BLE001
        if is_out_of_memory(e):
            raise
        text = str(e).strip()
        row.error = f"{type(e).__name__}: {text.splitlines()[-1][:200] if text else ''}"
    return row


def format_table(rows: Sequence[Row]) -> str:
    header = ("artifact", "runtime", "device", "max abs err", "max rel err", "err/allowed", "its rtol", "result")
    body = [(r.artifact, r.runtime, r.device, f"{r.max_abs:.3e}", f"{r.max_rel:.3e}", f"{r.worst:.3f}", f"{r.rtol:.1e}",
             "pass" if r.passed else "FAIL: " + r.why()) for r in rows]
    widths = [max(len(str(x[i])) for x in [header] + body) for i in range(len(header))]
    out = io.StringIO()
    for k, line in enumerate([header] + body):
        out.write("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() + "\n")
        if k == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")
    return out.getvalue().rstrip("\n")
