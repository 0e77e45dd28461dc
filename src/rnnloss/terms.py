r"""The seven terms as pure functions over sufficient statistics.

In the style of torchmetrics: :func:`statistics` reads the inputs once into a few sums
(:class:`Stats`; the *update*), sums of several batches or ranks simply add (the *sync*, see
``RNNLoss(sync_stats=True)``), and :func:`components` turns sums into the seven values (the
*compute*). :class:`~rnnloss.RNNLoss`, its distributed all-reduce and every exported graph run
these two functions and nothing else, so each formula is written once:

.. math::
    \text{mse} = \frac{\sum_k w_k (\hat y_k - y_k)^2}{\sum_k w_k}, \quad
    \text{in} = \frac{\|W_{in}\|_F^2}{N_{in} N_{hid}}, \quad
    \text{hid} = \frac{\|W_{hid}\|_F^2}{N_{hid}^2}, \quad
    \text{out} = \frac{\|W_{out}\|_F^2}{N_{out} N_{hid}},

.. math::
    \text{fr} = \frac{\sum_{s,i} r_{s,i}^2}{M N_{hid}}, \quad
    \sigma = \sqrt{\tfrac{1}{N_{hid}} \textstyle\sum_i (\bar r_i - \mu)^2}, \quad
    \text{cv} = \sigma / \mu, \quad
    \bar r_i = \tfrac{1}{M} \textstyle\sum_s r_{s,i}, \quad \mu = \tfrac{1}{N_{hid}} \textstyle\sum_i \bar r_i,

with w = 1 without a mask and M the number of rate samples (every leading index of ``states``).
The values here carry no λ; :class:`~rnnloss.RNNLoss` multiplies them by its ``lambdas``.
"""
import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .ratesums import accumulation_dtype, rate_sums
from .rules import Term

Flags = Tuple[bool, bool, bool, bool, bool, bool, bool]  # which components are active, in Term order


class Stats(NamedTuple):
    """The sufficient statistics of one batch (:func:`statistics`); sums of batches add entrywise.

    Shape: every field 0-dim except ``col`` (N_hid). ``sum_sq``, ``col`` and ``samples`` are float64;
    ``sq_err`` and ``weight`` are in the inputs' accumulation dtype (float64 under torch.export).
    """
    sq_err: Tensor   # Σ_k w_k (pred_k − label_k)²
    weight: Tensor   # Σ_k w_k: the element count without a mask
    samples: Tensor  # M: rate samples, states.numel() / N_hid
    sum_sq: Tensor   # Σ_{s,i} r_{s,i}²
    col: Tensor      # Σ_s r_{s,i}, one entry per neuron


def exporting() -> bool:
    """True while torch.export (and so the ONNX and ExecuTorch exporters) traces."""
    if torch.jit.is_scripting():
        return False
    return torch.compiler.is_exporting()


def compiling() -> bool:
    """True while torch.compile or torch.export traces (no data-dependent Python checks there)."""
    if torch.jit.is_scripting():
        return False
    return torch.compiler.is_compiling()


def error_sums(pred: Tensor, label: Tensor, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    r"""Numerator and denominator of ``mse``: :math:`\sum_k w_k (\hat y_k - y_k)^2` and :math:`\sum_k w_k`.

    ``mask`` holds the weights w, shaped like pred, or like pred without its last axis (one weight per
    sample, counted for each of its N_out outputs: the denominator is :math:`N_{out} \sum_s w_s`). With a
    mask both sums are float64 (pred-sized temporaries): weights as small as float32's smallest subnormal, or
    a float64 1e-300, neither underflow nor lose digits, and the sums of ranks or batches still add. (Below
    float64's normal range, 2.2e-308, weights lose digits; they are relative: scale them up.)

    Shape: pred, label: any, identical; mask: pred's shape or ``pred.shape[:-1]``. Returns two 0-dim
    tensors: the accumulation dtype without a mask, float64 with one or under torch.export.

    Example::

        >>> error_sums(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]))
        (tensor(1., dtype=torch.float64), tensor(1., dtype=torch.float64))
    """
    acc = torch.float64 if exporting() else torch.promote_types(accumulation_dtype(pred), accumulation_dtype(label))
    p, y = pred.to(acc), label.to(acc)
    if mask is None:  # the count as a tensor op on numel: torch.export keeps it symbolic
        return F.mse_loss(p, y, reduction="sum"), torch.zeros((), dtype=torch.float64, device=p.device) + p.numel()
    p, y, w = p.to(torch.float64), y.to(torch.float64), mask.to(torch.float64)
    diff = p - y
    if mask.dim() == p.dim():
        return (w * diff * diff).sum(), w.sum()
    return (w * (diff * diff).sum(-1)).sum(), w.sum() * p.size(-1)


def statistics(pred: Tensor, label: Tensor, states: Optional[Tensor], mask: Optional[Tensor], need_error: bool,
               need_sq: bool, need_col: bool) -> Stats:
    """The sums the active components need (the others are zeros): one read of pred and label
    (:func:`error_sums`), one of the rates (:func:`rnnloss.ratesums.rate_sums`).

    Shape: pred, label: any, identical; states: (…, N_hid) or None when no rate term is active."""
    zero = torch.zeros((), dtype=torch.float64, device=pred.device)
    sq_err, weight = error_sums(pred, label, mask) if need_error else (zero, zero)
    samples, sum_sq, col = zero, zero, zero
    if states is not None and (need_sq or need_col):
        samples = zero + states.numel() // states.size(-1)
        sum_sq, col = rate_sums(states, need_sq, need_col)
    return Stats(sq_err, weight, samples, sum_sq, col)


def mean_square(w: Tensor) -> Tensor:
    r"""A weight penalty: :math:`\|W\|_F^2 / (\text{rows} \cdot \text{cols})`, the mean of the squared entries.

    Shape: any; returns 0-dim in the accumulation dtype (float16/bfloat16 give float32), float64 under
    torch.export (other runtimes add long sums one term at a time: 1e-5 would not hold for N_hid = 512).

    Example::

        >>> mean_square(torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
        tensor(2.5000)
    """
    wa = w.to(torch.float64 if exporting() else accumulation_dtype(w))
    return (wa * wa).sum() / w.numel()


def rate_sd_cv(mean_rates: Tensor) -> Tuple[Tensor, Tensor]:
    r"""``fr_sd`` (σ) and ``fr_cv`` (σ / μ) from the per-neuron means :math:`\bar r_i`.

    σ is the population SD of the :math:`\bar r_i` (divide by N_hid), taken from the deviations
    themselves (no E[x²] − E[x]² cancellation under a large mean). μ, the mean of the
    :math:`\bar r_i`, is :math:`m + \frac{1}{N}\sum_i (\bar r_i - m)` with m the plain mean: the same
    function, but exactly the common value when every :math:`\bar r_i` is equal, so σ = 0 then.

    - σ = 0 (e.g. every neuron silent): σ = CV = 0 with zero gradients; the square root's infinite
      slope at 0 is never evaluated (a double ``where``).
    - σ > 0 and μ = 0: the CV is undefined; returns +inf.
    - NaN or inf rates give NaN: the guard tests ``var == 0``, false for NaN.

    Shape: (N_hid,) in, two 0-dim tensors out.

    Example::

        >>> rate_sd_cv(torch.tensor([1.0, 3.0]))
        (tensor(1.), tensor(0.5000))
    """
    rough = mean_rates.mean()
    mu = rough + (mean_rates - rough).mean()
    dev = mean_rates - mu
    var = (dev * dev).mean()
    flat = var == 0
    sd = torch.where(flat, torch.zeros_like(var), torch.sqrt(torch.where(flat, torch.ones_like(var), var)))
    centred = mu == 0
    cv = torch.where(centred, torch.full_like(var, math.inf), sd / torch.where(centred, torch.ones_like(mu), mu))
    return sd, torch.where(flat, torch.zeros_like(var), cv)


def components(stats: Stats, w_in: Tensor, w_hid: Tensor, w_out: Tensor, on: Flags, dtype: torch.dtype) -> Tensor:
    """The seven values (λ not applied) in :class:`~rnnloss.rules.Term` order; an inactive one (``on``
    False) is never computed and is exactly 0. ``stats`` may be the sum over batches or ranks.

    Shape: w_in (N_hid, N_in), w_hid (N_hid, N_hid), w_out (N_out, N_hid); returns (7,) in ``dtype``.

    Example (two neurons whose mean rates are 1 and 3: μ = 2, σ = 1, CV = 0.5; mean r² = 5)::

        >>> states = torch.tensor([1.0, 3.0]).repeat(2, 3, 1)
        >>> stats = statistics(torch.ones(2, 3, 1), torch.zeros(2, 3, 1), states, None, True, True, True)
        >>> components(stats, torch.zeros(2, 1), torch.zeros(2, 2), torch.zeros(1, 2), (True,) * 7, torch.float32)
        tensor([1.0000, 0.0000, 0.0000, 0.0000, 5.0000, 1.0000, 0.5000])
    """
    zero = torch.zeros((), dtype=dtype, device=stats.samples.device)
    mse, c_in, c_hid, c_out, fr, fr_sd, fr_cv = zero, zero, zero, zero, zero, zero, zero
    if on[Term.MSE.value]:
        weight = stats.weight
        mse = (stats.sq_err / torch.where(weight == 0, torch.ones_like(weight), weight)).to(dtype)
    if on[Term.IN.value]:
        c_in = mean_square(w_in).to(dtype)
    if on[Term.HID.value]:
        c_hid = mean_square(w_hid).to(dtype)
    if on[Term.OUT.value]:
        c_out = mean_square(w_out).to(dtype)
    if on[Term.FR.value]:
        fr = (stats.sum_sq / (stats.samples * w_hid.size(0))).to(dtype)
    if on[Term.FR_SD.value] or on[Term.FR_CV.value]:
        sd, cv = rate_sd_cv(stats.col / stats.samples)
        if on[Term.FR_SD.value]:
            fr_sd = sd.to(dtype)
        if on[Term.FR_CV.value]:
            fr_cv = cv.to(dtype)
    return torch.stack([mse, c_in, c_hid, c_out, fr, fr_sd, fr_cv])
