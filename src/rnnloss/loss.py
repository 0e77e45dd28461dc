r"""The composite CTRNN loss: task MSE, weight-size penalties and firing-rate regularisers.

Every formula lives in one function here with its math in the docstring; :class:`RNNLoss`
only validates its inputs, picks the active ones and applies the λ weights.

How the sums are taken (accuracy and speed; measured in BENCHMARKS.md):

- Rate statistics (``fr``, ``fr_sd``, ``fr_cv``) need two sums over the rates r (M samples × N
  neurons): Σ r² and the per-neuron sums Σ_s r_{s,i}. Both are accumulated so that float32 rates
  keep the contract's accuracy at 10^7 elements: Σ r² as squared row norms (N terms each) added in
  float64; the per-neuron sums over blocks of rows in the rates' dtype, the block sums added in
  float64 (:func:`rate_sums`). The sample axes are read in memory order, so a transposed view
  (batch-first rates) costs no copy.
- Eager mode wraps those sums in an autograd Function whose backward writes the gradient
  :math:`2 g_{sq}\, r + g_{col}` in one fused pass; that backward is itself made of differentiable
  operations, so second-order gradients (Hessian-vector products, gradient penalties) are exact.
- TorchScript (it cannot compile an autograd Function) takes the eager forward's values and, where
  a gradient is wanted, attaches stock differentiable operations that are the same functions of
  the rates (:func:`_scripted_rate_sums`): on the CPU at the cost of one more full-size write than
  eager, on CUDA as sums of squares on blocks of about 2^24 rates. ``torch.compile`` gets plain operations and fuses
  them.
- ``torch.export`` (and so the ONNX exporter) gets the sums in float64 throughout: other runtimes
  (ONNX Runtime) add long reductions sequentially, which in float32 misses the accuracy bound.
"""
import difflib
import math
from typing import Final, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import accumulation_dtype, check_float_tensor, dtype_name, shape_of
from .model import CTRNN

COMPONENT_NAMES: Tuple[str, ...] = ("mse", "in", "hid", "out", "fr", "fr_sd", "fr_cv")
LAMBDA_NAMES: Tuple[str, ...] = tuple("lambda_" + name for name in COMPONENT_NAMES)
FLOAT32_MAX = 3.4028234663852886e38  # the largest λ accepted: every λ must be finite in float32


def _exporting() -> bool:
    """True while torch.export (and so the ONNX exporter) traces the loss."""
    if torch.jit.is_scripting():
        return False
    return torch.compiler.is_exporting()


def _compiling() -> bool:
    """True while torch.compile or torch.export traces: no autograd Function, no data-dependent checks."""
    if torch.jit.is_scripting():
        return False
    return torch.compiler.is_compiling()


def mean_square(x: Tensor) -> Tensor:
    r"""Mean of squares over every element: :math:`\frac{1}{n}\sum_k x_k^2`.

    The weight penalties: :math:`\|W\|_F^2 / (\text{rows}\cdot\text{cols})`. float16/bfloat16
    accumulate in float32. Plain differentiable operations (second order exact).
    """
    xa = x.to(accumulation_dtype(x))
    return (xa * xa).sum() / x.numel()


def mean_squared_error(pred: Tensor, label: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    r"""``mse``: the (weighted) mean of squared errors over every element (any shape).

    .. math::
        \text{without a mask: } \frac{1}{n}\sum_k (\hat y_k - y_k)^2, \qquad
        \text{with weights } w: \frac{\sum_k w_k (\hat y_k - y_k)^2}{\sum_k w_k}

    ``mask`` is shaped like pred (one weight per element) or like pred without its last axis (one
    weight per sample, counted once for each of the sample's N_out outputs, so the denominator is
    N_out·Σw). Σw = 0 gives 0 with a zero gradient. A weight of 0 still propagates a NaN or inf
    error (0·NaN is NaN). Returns float64 under torch.export (see the module docstring), else the
    accumulation dtype of pred and label.
    """
    exporting = _exporting()
    acc = torch.float64 if exporting else torch.promote_types(accumulation_dtype(pred), accumulation_dtype(label))
    p, y = pred.to(acc), label.to(acc)
    if mask is None and not exporting:
        return F.mse_loss(p, y)
    if mask is None:
        diff = p - y
        return (diff * diff).sum() / diff.numel()
    weighted, weight = weighted_error_sums(p, y, mask)
    return weighted / torch.where(weight == 0, torch.ones_like(weight), weight)


def weighted_error_sums(p: Tensor, y: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    r"""The numerator and denominator of the masked ``mse``, in ``p``'s dtype:
    :math:`\sum_k w_k (p_k - y_k)^2` and :math:`\sum_k w_k` (:math:`N_{out}\sum_s w_s` when the
    mask has one weight per sample, i.e. pred's shape without its last axis)."""
    diff = p - y
    w = mask.to(p.dtype)
    if mask.dim() == p.dim():
        return (w * diff * diff).sum(), w.sum()
    return (w * (diff * diff).sum(-1)).sum(), w.sum() * p.size(-1)


def _samples_in_memory_order(states: Tensor) -> Tensor:
    """``states`` with its leading (sample) axes permuted into memory order, largest stride first.

    A transposed view — the batch-first rates of a time-first model, or the reverse — becomes
    contiguous, so it can be read as (samples, N_hid) rows without a copy. Every statistic here is
    a sum over samples, which does not depend on their order; the permutation is a view and
    gradients flow through it unchanged.
    """
    if states.dim() <= 2 or states.is_contiguous():
        return states
    strides = states.stride()
    order: List[int] = []
    for axis in range(states.dim() - 1):  # insertion sort, stable: descending stride
        at = len(order)
        while at > 0 and strides[order[at - 1]] < strides[axis]:
            at -= 1
        order.insert(at, axis)
    order.append(states.dim() - 1)
    return states.permute(order)


def _neuron_sums_f64(states: Tensor) -> Tensor:
    r"""Per-neuron sums :math:`\sum_s r_{s,i}` in float64, accurate for float32 rates at 10^7.

    The rates are read as (samples, N_hid) rows (a view when :func:`_samples_in_memory_order`
    makes them contiguous, a copy otherwise); blocks of 1024 rows are summed in the accumulation
    dtype (each block sum float32-exact to ~1e-7) and the block sums added in float64.
    Differentiable.
    """
    block = 1024
    acc = accumulation_dtype(states)
    n_hid = states.size(-1)
    if states.dim() == 1:
        return states.to(torch.float64, copy=True)  # a fresh tensor even for float64 rates
    rows = _samples_in_memory_order(states).reshape(-1, n_hid)
    count = rows.size(0)
    blocks = count // block
    if blocks <= 1:
        return rows.to(torch.float64).sum(0)
    if blocks * block == count:  # whole groups (the blocks of _blocked_rate_sums): three operations
        return rows.reshape(blocks, block, n_hid).sum(1, dtype=acc).sum(0, dtype=torch.float64)
    head = rows.narrow(0, 0, blocks * block).reshape(blocks, block, n_hid).sum(1, dtype=acc)
    tail = rows.narrow(0, blocks * block, count - blocks * block).to(torch.float64).sum(0)
    return head.to(torch.float64).sum(0) + tail


def _sample_parts(states: Tensor, rows: int, copied_rows: int) -> List[Tensor]:
    """Views of ``states`` in memory order, each holding about ``rows`` samples (all of them when
    ``rows`` is -1), or at most ``copied_rows`` where a part must be copied; ``reshape(-1, N_hid)``
    of each gives its (samples, N_hid) rows.

    When the rates are contiguous in some order of their sample axes
    (:func:`_samples_in_memory_order`) or 2-D, the parts are row blocks and that reshape is a view.
    Otherwise (expanded or neuron-strided rates) they are slices along the sample axes in memory
    order — the first axis, then within a slice still too large the next, size-1 axes skipped — so
    that the reshape copies one part at a time, never more than ``copied_rows`` samples.
    """
    ordered = _samples_in_memory_order(states)
    n_hid = ordered.size(-1)
    if ordered.dim() <= 2 or ordered.is_contiguous():
        rows_all = ordered.reshape(-1, n_hid)
        return [rows_all] if rows == -1 else rows_all.split(rows)
    parts: List[Tensor] = []
    pending: List[Tensor] = [ordered]  # a stack, children pushed in reverse: parts stay in memory order
    while len(pending) > 0:
        part = pending.pop()
        if part.numel() <= copied_rows * n_hid or part.dim() <= 1:
            parts.append(part)
            continue
        if part.dim() == 2:
            children = part.split(copied_rows)  # its rows are samples
        elif part.size(0) == 1:
            children = [part[0]]
        else:
            per_slice = max(1, part[0].numel() // max(1, n_hid))
            children = part.split(max(1, copied_rows // per_slice))
        for k in range(len(children) - 1, -1, -1):
            pending.append(children[k])
    return parts


def _blocked_rate_sums(states: Tensor, need_sq: bool, need_col: bool, row_norms: bool) -> Tuple[Tensor, Tensor]:
    """Σr² and the per-neuron sums (float64), the rates read in a few blocks (views where the layout
    allows, :func:`_sample_parts`).

    CPU: blocks of about 2^20 rates (4 MiB in float32), each read twice back to back — squares,
    then column sums — so the second read comes from the cache. A GPU (any device but the CPU):
    a kernel launch costs about as much as reading 2^24 rates, so float32 rates whose Σ r² is
    taken as row norms are one block when they are contiguous in some order of their sample axes
    and hold at least 16 neurons and 16384 samples (nothing is copied or squared but per-sample
    norms and per-neuron sums, each within 1/8 of the rates); otherwise (other dtypes, Σ b·b,
    layouts that must be copied, fewer neurons or samples) blocks of about 2^24 rates, which bounds
    each temporary; each reduction reads its block once at memory speed.

    Within a block Σ b² is in the accumulation dtype (~1e-7 relative) and the column sums are
    taken over groups of 1024 rows (:func:`_neuron_sums_f64`; a float32 partial sum overflows
    only for rates beyond about 3.3e35); block results are added in float64; a single CPU block
    keeps float64 column sums (exact for float32 rates: equal neurons stay equal). Σ b² is taken
    as squared row norms with ``row_norms`` (values only: no temporary, not twice differentiable
    at a zero row) on CUDA and, on the CPU, up to 1024 neurons (torch's CPU float32 row norm errs
    by about N·ε/16, 1.2e-5 at N = 8192; CUDA's is a tree reduction), or as Σ b·b (differentiable
    to any order, a block-sized temporary; ``split``'s backward concatenates the block gradients
    once).
    """
    n_hid = states.size(-1)
    acc = accumulation_dtype(states)
    gpu = states.device.type != "cpu"
    step = max(1, (16777216 if gpu else 1048576) // n_hid)
    if step >= 2048:
        step = step // 1024 * 1024  # whole groups of 1024 rows for the column sums
    norms_ok = row_norms and (gpu or n_hid <= 1024)
    # One block keeps every temporary within 1/8 of the rates: the float64 norms (8 bytes a sample)
    # need 16 neurons or more, the column sums' float64 rest (under 1024 samples) 16384 samples.
    whole = gpu and norms_ok and acc == states.dtype and n_hid >= 16 and states.numel() >= 16384 * n_hid
    zero = torch.zeros((), dtype=torch.float64, device=states.device)
    squares: List[Tensor] = []
    colsum = zero
    parts = _sample_parts(states, -1 if whole else step, step)
    exact_columns = len(parts) == 1 and not gpu  # a cache-sized block: float64 sums (on a GPU, a copy)
    for i, part in enumerate(parts):
        block = part.reshape(-1, n_hid).to(acc)
        if need_sq:
            if norms_ok:
                norms = torch.linalg.vector_norm(block, dim=-1).to(torch.float64)
                squares.append((norms * norms).sum())
            else:
                squares.append((block * block).sum().to(torch.float64))
        if need_col:  # added block by block: no stack of per-block sums (N_hid floats each)
            col = block.to(torch.float64).sum(0) if exact_columns else _neuron_sums_f64(block)
            colsum = col if i == 0 else colsum + col
    sumsq = (squares[0] if len(squares) == 1 else torch.stack(squares).sum()) if need_sq else zero
    return sumsq, (colsum if need_col else zero)


def _plain_rate_sums(states: Tensor, need_sq: bool, need_col: bool) -> Tuple[Tensor, Tensor]:
    """Σr² and the per-neuron sums (float64) as plain differentiable operations (torch.compile,
    which fuses them itself)."""
    zero = torch.zeros((), dtype=torch.float64, device=states.device)
    sumsq, colsum = zero, zero
    if need_sq:
        r = states.to(accumulation_dtype(states))
        sumsq = (r * r).sum(-1).to(torch.float64).sum()
    if need_col:
        colsum = _neuron_sums_f64(states)
    return sumsq, colsum


def _exported_rate_sums(states: Tensor, need_sq: bool, need_col: bool) -> Tuple[Tensor, Tensor]:
    """Σr² and the per-neuron sums for torch.export / ONNX: the rates cast to float64 first."""
    r = states.to(torch.float64)
    zero = torch.zeros((), dtype=torch.float64, device=states.device)
    sumsq, colsum = zero, zero
    if need_sq:
        norms = torch.linalg.vector_norm(r, dim=-1)  # ONNX ReduceL2: no r² temporary
        sumsq = (norms * norms).sum()
    if need_col:
        colsum = r.sum(dim=list(range(r.dim() - 1))) if r.dim() > 1 else r
    return sumsq, colsum


class _RateSums(torch.autograd.Function):
    r"""Eager fast path: (Σr², per-neuron sums) with a one-pass backward.

    Forward: :func:`_rate_sum_values`. Backward:
    :math:`\partial/\partial r = 2 g_{sq}\, r + g_{col}` (``g_col`` broadcast over the samples)
    written once by ``addcmul``. The backward is built from differentiable operations on the
    saved rates, so autograd differentiates it again for second-order gradients.
    """

    generate_vmap_rule = True  # torch.func (grad, vmap for per-sample gradients) works through it

    @staticmethod
    def forward(states: Tensor, need_sq: bool, need_col: bool):  # type: ignore[override]
        return _rate_sum_values(states, need_sq, need_col)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        states, need_sq, need_col = inputs
        ctx.save_for_backward(states)
        ctx.save_for_forward(states)
        ctx.need = (need_sq, need_col)

    @staticmethod
    def jvp(ctx, states_t: Tensor, _sq: None, _col: None):  # type: ignore[override]
        r"""Forward mode (``torch.func.jvp``, ``jacfwd``, ``hessian``): tangents of the two sums,
        :math:`2\sum r\,\dot r` and the per-neuron sums of :math:`\dot r`."""
        (states,) = ctx.saved_tensors
        need_sq, need_col = ctx.need
        zero = torch.zeros((), dtype=torch.float64, device=states.device)
        t_sq = 2.0 * (states.to(torch.float64) * states_t.to(torch.float64)).sum() if need_sq else zero
        t_col = _neuron_sums_f64(states_t) if need_col else zero
        return t_sq, t_col

    @staticmethod
    def backward(ctx, g_sq: Tensor, g_col: Tensor):  # type: ignore[override]
        (states,) = ctx.saved_tensors
        need_sq, need_col = ctx.need
        acc = accumulation_dtype(states)
        scale = (2.0 * g_sq).to(acc)
        if need_sq and need_col:
            grad = torch.addcmul(g_col.to(acc), states, scale)
        elif need_sq:
            grad = states * scale
        else:
            grad = g_col.to(acc).expand(states.shape)
        return grad.to(states.dtype), None, None


def _rate_sum_values(states: Tensor, need_sq: bool, need_col: bool) -> Tuple[Tensor, Tensor]:
    """The values of Σr² and the per-neuron sums (float64), fast and accurate; for a graph, see callers.

    :func:`_blocked_rate_sums`: one sweep through the rates in any layout, Σr² as squared row norms
    for float32/16 rates (on the CPU up to 1024 neurons; no temporary) and as Σ b·b per block
    otherwise (float64 rates: no sqrt-then-square rounding). Used by the eager forward and,
    without gradients, by TorchScript, so both give the same values to the bit.
    """
    return _blocked_rate_sums(states, need_sq, need_col, states.dtype != torch.float64)


def _scripted_rate_sums(states: Tensor, need_sq: bool, need_col: bool) -> Tuple[Tensor, Tensor]:
    r"""TorchScript's rate sums (it cannot compile :class:`_RateSums`): the values of
    :func:`_rate_sum_values`, and plain differentiable operations where a gradient is wanted.

    - No gradient wanted (``no_grad`` or rates that do not require grad): :func:`_rate_sum_values`.
    - CPU: :func:`_cpu_rate_sums_for_autograd` (the gradient written in two full-size passes).
    - CUDA, or rates holding inf or NaN (or float64 rates whose sums overflow float64):
      :func:`_blocked_rate_sums` as Σ b·b per block (no host–device synchronisation; inf and NaN
      propagate as through any plain sum).

    Every branch is exact to any order of differentiation (``gradgradcheck``, Hessian-vector
    products); values agree with the eager module's to float32 rounding, and to the bit where no
    gradient is wanted or on the CPU path.
    """
    if not (torch.is_grad_enabled() and states.requires_grad):
        return _rate_sum_values(states, need_sq, need_col)
    if states.device.type == "cpu":
        sums = _cpu_rate_sums_for_autograd(states, need_sq, need_col)
        if sums is not None:
            return sums
    return _blocked_rate_sums(states, need_sq, need_col, False)


def _cpu_rate_sums_for_autograd(states: Tensor, need_sq: bool, need_col: bool) -> Optional[Tuple[Tensor, Tensor]]:
    r"""Σr² and the per-neuron sums for TorchScript on the CPU: exact values, a two-pass gradient.

    Values come from :func:`_rate_sum_values` on the detached rates; the graph is attached by adding
    :math:`q - \operatorname{detach}(q)` (exactly 0) for :math:`q = \sum_{s,i} r_{s,i}^2` taken by
    ``mse_loss`` against zero and :math:`q_i = \sum_s r_{s,i}`. Those are the same functions of r, so
    every derivative is theirs: :math:`\partial/\partial r = 2 g_{sq}\, r + g_{col}`, the Hessian
    :math:`2 g_{sq} I`. ``mse_loss``'s backward writes :math:`2 g_{sq}\, r` in one pass; the
    per-neuron sums are taken first so that autograd, which runs later operations first, adds their
    broadcast gradient into that fresh tensor in place. Stock operations need one more full-size
    write than the eager Function (``mse_loss``'s own temporary). When a float32 q overflows (rates
    near 1e19 and beyond; ``q - q`` would be NaN) both are taken again in float64; returns None when
    they are still not finite (inf or NaN rates, or float64 rates whose sums overflow float64). The
    CPU reads that flag for free.
    """
    sumsq, colsum = _rate_sum_values(states.detach(), need_sq, need_col)
    rows = _samples_in_memory_order(states).reshape(-1, states.size(-1)).to(accumulation_dtype(states))
    col, sq = _sums_for_autograd(rows, need_sq, need_col)
    if not bool(torch.isfinite(col).all() & torch.isfinite(sq)):
        col, sq = _sums_for_autograd(rows.to(torch.float64), need_sq, need_col)
        if not bool(torch.isfinite(col).all() & torch.isfinite(sq)):
            return None
    if need_col:
        colsum = colsum + (col - col.detach()).to(torch.float64)
    if need_sq:
        sumsq = sumsq + (sq - sq.detach()).to(torch.float64)
    return sumsq, colsum


def _sums_for_autograd(rows: Tensor, need_sq: bool, need_col: bool) -> Tuple[Tensor, Tensor]:
    """The per-neuron sums (first: see :func:`_cpu_rate_sums_for_autograd`) and Σr² of (samples, N_hid)
    rows as differentiable operations in their dtype; a zero for a sum not wanted."""
    col = rows.sum(0) if need_col else rows.new_zeros(())
    sq = F.mse_loss(rows, rows.new_zeros((1, 1)).expand(rows.shape), reduction="sum") if need_sq else rows.new_zeros(())
    return col, sq


def rate_sums(states: Tensor, need_sq: bool, need_col: bool) -> Tuple[Tensor, Tensor]:
    r"""float64 :math:`\sum_{s,i} r_{s,i}^2` and per-neuron sums :math:`\sum_s r_{s,i}` of the rates.

    ``states`` is (…, N_hid); every leading index (batch, time, …) is a sample. Only the sums
    asked for are computed (the other is a float64 zero). Eager mode uses :class:`_RateSums`,
    TorchScript :func:`_scripted_rate_sums`, torch.compile :func:`_plain_rate_sums`, torch.export
    :func:`_exported_rate_sums`; all of them give the same values to float32 rounding.
    """
    if torch.jit.is_scripting():
        return _scripted_rate_sums(states, need_sq, need_col)
    if _compiling() and not _exporting():
        return _plain_rate_sums(states, need_sq, need_col)
    return _eager_or_exported_rate_sums(states, need_sq, need_col)


@torch.jit.unused
def _eager_or_exported_rate_sums(states: Tensor, need_sq: bool, need_col: bool) -> Tuple[Tensor, Tensor]:
    if _exporting():
        return _exported_rate_sums(states, need_sq, need_col)
    return _RateSums.apply(states, need_sq, need_col)


def rate_sd_cv(mean_rates: Tensor) -> Tuple[Tensor, Tensor]:
    r"""``fr_sd`` and ``fr_cv`` from the per-neuron means :math:`\bar r_i` (i = 1 … N_hid).

    .. math::
        \mu = \frac{1}{N}\sum_i \bar r_i, \qquad
        \sigma = \sqrt{\frac{1}{N}\sum_i (\bar r_i - \mu)^2}, \qquad
        \mathrm{CV} = \sigma / \mu

    μ, the mean of the per-neuron means, equals the mean of all rates; it is taken as
    :math:`m + \frac{1}{N}\sum_i (\bar r_i - m)` with :math:`m` the plain mean (the same function,
    so the same derivatives): when every :math:`\bar r_i` is equal, the plain mean of 7 of them need
    not round back to their value, but the correction, a few ulps computed exactly, restores it.
    σ is the population SD (divide by N, not N − 1) and is computed from the deviations
    themselves, so a large mean with a tiny spread loses no precision (no E[x²] − E[x]²
    cancellation).

    Edge cases:
        - σ = 0 (every neuron has the same mean rate, e.g. all silent): σ = 0 and CV = 0 with
          zero gradients. The square root's infinite slope at 0 is never evaluated.
        - σ > 0 and μ = 0: the CV is undefined; returns +inf (and a zero gradient).
        - NaN or ±inf in the rates: σ and CV are NaN. The σ = 0 guard tests ``var == 0``,
          which is false for NaN, so it never turns a NaN into 0.
    """
    rough = mean_rates.mean()
    mu = rough + (mean_rates - rough).mean()  # = mean(r̄); exactly the common value when all are equal
    dev = mean_rates - mu
    var = (dev * dev).mean()
    flat = var == 0
    # Double-where: the untaken branch is evaluated on a safe value so its gradient stays finite.
    sd = torch.where(flat, torch.zeros_like(var), torch.sqrt(torch.where(flat, torch.ones_like(var), var)))
    centred = mu == 0
    cv = torch.where(centred, torch.full_like(var, math.inf), sd / torch.where(centred, torch.ones_like(mu), mu))
    cv = torch.where(flat, torch.zeros_like(var), cv)
    return sd, cv


class RNNLoss(nn.Module):
    r"""Composite loss of a :class:`~rnnloss.CTRNN`.

    ``forward(pred, label, states=None, mask=None) -> (total, components)`` where ``components``
    has length 7 in the fixed order of :attr:`component_names` (λ already applied) and ``total``
    is ``components.sum()``:

    ====  ========  ==========================================================================
    0     mse       λ_mse · mean((pred − label)²) over every element; with a mask w:
                    λ_mse · Σ w·(pred − label)² / Σ w  (:func:`mean_squared_error`)
    1     in        λ_in · ‖W_in‖²_F / (N_in · N_hid)
    2     hid       λ_hid · ‖W_hid‖²_F / N_hid²
    3     out       λ_out · ‖W_out‖²_F / (N_out · N_hid)
    4     fr        λ_fr · mean of r² over every sample and neuron
    5     fr_sd     λ_fr_sd · σ, σ the population SD of the per-neuron mean rates
    6     fr_cv     λ_fr_cv · σ / μ, μ the mean of all rates
    ====  ========  ==========================================================================

    With ``sync_stats=True`` the statistics behind mse, fr, fr_sd and fr_cv are all-reduced over
    ``process_group`` (default: the world group) so every rank computes the global-batch loss
    (eager only; see :meth:`_synced_statistics`).

    The weights are the live parameters of ``model`` (held as the submodule ``model``). A
    component whose λ is 0 at construction is inactive: never computed, its entry exactly 0.

    λ values live in the float64 buffer ``lambdas`` (shape [7]): made on the model's device (the
    CPU for a meta model), it moves with ``.to(device)``,
    keeps float64 under ``.float()``/``.half()`` (so float64 inputs get λ exactly), is saved in
    ``state_dict`` and can be changed at run time to anneal an active component. ``forward``
    validates the buffer — its dtype and shape in every call; its values on the CPU in every call,
    elsewhere when the buffer may have changed (written in place, seen through its version
    counter; another tensor; a module from a file or a copy), so it is read back once per change,
    not once per call (a write through an alias with a counter of its own, ``.data``, DLPack or
    ``untyped_storage``, goes unseen there; exports read λ back in any case):
    a negative, NaN or infinite λ, a non-zero λ for an inactive component, or a buffer that is not
    float64 [7] raises ValueError. Loading a
    state_dict that gives an inactive component a non-zero λ raises too. Under ``torch.compile``
    and in exported graphs the buffer is not re-validated (a graph holds no data-dependent check).

    Shape:
        - pred, label: any shape, identical (no broadcasting); commonly (T, B, N_out).
        - states: (…, N_hid), every leading index a sample; required when λ_fr, λ_fr_sd or
          λ_fr_cv > 0.
        - mask: pred's shape or pred's shape without its last axis; floating, integer or bool
          weights, finite and >= 0.
        - total: 0-dim; components: (7,). float16/bfloat16 inputs give float32; otherwise the
          promoted dtype of the inputs and weights.
    """

    __jit_unused_properties__ = ["active"]
    component_names: List[str]
    _on: Final[Tuple[bool, bool, bool, bool, bool, bool, bool]]
    _need_states: Final[bool]
    _need_means: Final[bool]
    sync_stats: Final[bool]
    n_hid: Final[int]
    _lambda_version: int
    _lambda_ptr: int
    _lambda_checked: Tensor
    _lambda_mark: Tensor
    _lambda_mark_version: int
    _lambda_max: Final[float]

    def __init__(
        self,
        model: CTRNN,
        *,
        lambda_mse: float = 1.0,
        lambda_in: float = 0.0,
        lambda_hid: float = 0.0,
        lambda_out: float = 0.0,
        lambda_fr: float = 0.0,
        lambda_fr_sd: float = 0.0,
        lambda_fr_cv: float = 0.0,
        sync_stats: bool = False,
        process_group=None,
        **unknown: float,
    ) -> None:
        super().__init__()
        if unknown:
            name = sorted(unknown)[0]
            valid = list(LAMBDA_NAMES) + ["sync_stats", "process_group"]
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"RNNLoss got an unexpected keyword argument {name!r}{hint}; valid keywords are {valid}")
        if not isinstance(sync_stats, bool):
            raise TypeError(f"sync_stats must be a bool, got {sync_stats!r}")
        if process_group is not None and not sync_stats:
            raise ValueError("process_group is only used with sync_stats=True, got sync_stats=False")
        if not isinstance(model, CTRNN):
            raise TypeError(f"model must be a CTRNN (or a subclass), got {type(model).__name__}")
        values = (lambda_mse, lambda_in, lambda_hid, lambda_out, lambda_fr, lambda_fr_sd, lambda_fr_cv)
        for name, value in zip(LAMBDA_NAMES, values):
            _check_lambda(name, value)
        self.model = model
        self.sync_stats = sync_stats
        self.process_group = process_group
        self.component_names = list(COMPONENT_NAMES)
        self.n_hid = model.n_hid
        on = tuple(float(v) > 0.0 for v in values)
        self._on = on  # type: ignore[assignment]
        self._need_means = on[5] or on[6]
        self._need_states = on[4] or self._need_means
        # On the device of the input weights (the one forward checks pred against): a CPU buffer
        # beside a CUDA model would be copied to the GPU in every forward, a host-device
        # synchronisation per call. A meta model keeps real values on the CPU (to_empty, then load).
        device = model.recurrent_layer.input_layer.weight.device
        if device.type == "meta":
            device = torch.device("cpu")
        self.register_buffer("lambdas", torch.tensor([float(v) for v in values], dtype=torch.float64, device=device))
        # What tells a validated λ buffer from a changed one off the CPU (see _check_lambdas): the buffer
        # last validated itself, its version counter and data pointer, and a CPU marker bumped by each
        # validation (a module fresh from a file has every version counter at 0).
        self._forget_checked_lambdas()
        self._lambda_mark = torch.zeros(1)
        self._lambda_mark_version = -1
        self._lambda_max = FLOAT32_MAX
        self._register_load_state_dict_pre_hook(_refuse_inactive_lambdas, with_module=True)

    @property
    def active(self) -> List[str]:
        """Names of the components computed by this loss (fixed at construction)."""
        return [name for name, on in zip(COMPONENT_NAMES, self._on) if on]

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: refuse clearly instead of failing on a ProcessGroup.
        if self.sync_stats:
            raise RuntimeError(_SYNC_EAGER_ONLY)
        self._forget_checked_lambdas()
        return self

    def _apply(self, fn, recurse=True):
        # .float(), .half(), .to(dtype) would round λ: keep the buffer float64, move its device only.
        lambdas = self.lambdas
        super()._apply(fn, recurse)
        self._forget_checked_lambdas()
        device = self._buffers["lambdas"].device
        if lambdas.is_meta and device.type != "meta":
            # to_empty() after .to("meta"): the values are gone; NaN, which forward refuses, until
            # load_state_dict brings them.
            self._buffers["lambdas"] = torch.full((7,), math.nan, dtype=torch.float64, device=device)
        else:
            self._buffers["lambdas"] = lambdas.to(device=device)
        return self

    def _check_lambdas(self, force: bool = False) -> None:
        """Validate ``lambdas``: its dtype and shape on every call (metadata, free); its values on every
        call on the CPU (7 numbers) or with ``force`` (an export: λ become constants of the graph),
        elsewhere only when the buffer may have changed since the last validation, since a read-back
        there is a host–device synchronisation: when it is another tensor (``.to()``, assignment,
        ``load_state_dict(assign=True)``), was written in place (its version counter; in eager mode
        also its data pointer), or the module came from a file or a copy (the CPU marker's version
        counter is 0 again). A write through an alias that has a version counter of its own
        (``.data``, DLPack, ``untyped_storage``) goes unseen off the CPU."""
        # A scripted module's .half() / .to(dtype) converts the buffer (the eager module's _apply
        # keeps it float64): refused here, not used rounded.
        if self.lambdas.dtype != torch.float64 or self.lambdas.dim() != 1 or self.lambdas.size(0) != 7:
            raise ValueError("lambdas must be a float64 tensor of shape [7], got dtype {} and shape {}".format(
                dtype_name(self.lambdas), shape_of(self.lambdas)))
        if not torch.jit.is_scripting() and _compiling():
            return
        # On the CPU nothing below the values is read, nothing recorded. Nor anywhere for a buffer
        # without a version counter (made under inference_mode) or a torch.func wrapper (no data
        # pointer): those are validated in every call.
        cached = not force and not _readback_is_free(self.lambdas) and not self.lambdas.is_inference()
        if cached and not torch.jit.is_scripting() and _is_transformed(self.lambdas):
            cached = False
        version, ptr, mark = 0, 0, 0  # TorchScript has no data_ptr(); there the version tells a write
        if cached:
            if torch.jit.is_scripting():
                version = self.lambdas._version()
                mark = self._lambda_mark._version()
            else:
                version = _eager_version(self.lambdas)
                ptr = self.lambdas.data_ptr()
                mark = _eager_version(self._lambda_mark)
            if (self.lambdas is self._lambda_checked and version == self._lambda_version
                    and ptr == self._lambda_ptr and mark == self._lambda_mark_version):
                return
        values: List[float] = self.lambdas.tolist()
        for i in range(len(values)):
            value = values[i]
            name = self.component_names[i]
            # No number in these messages: eager, TorchScript and C++ print floats differently.
            if not (value >= 0.0 and value <= self._lambda_max):
                kind = "NaN" if math.isnan(value) else ("a negative value" if value < 0.0 else
                                                     "a value beyond float32's range")
                raise ValueError("lambdas[{}] ('{}') must be finite and >= 0; it was set to {}".format(i, name, kind))
            if value != 0.0 and not self._on[i]:
                raise ValueError("lambdas[{}] ('{}') is non-zero but component '{}' is inactive (its lambda was 0 at "
                                 "construction); build the loss with a non-zero lambda_{}".format(i, name, name, name))
        if cached:
            with torch.no_grad():
                self._lambda_mark.add_(1.0)
            self._lambda_mark_version = mark + 1
            self._lambda_checked = self.lambdas
            self._lambda_version = version
            self._lambda_ptr = ptr

    def _forget_checked_lambdas(self) -> None:
        """Drop the record of the last validation (the next call off the CPU validates again), so
        that no reference to a buffer of another device outlives a move or goes into a file."""
        self._lambda_checked = torch.empty(0, dtype=torch.float64)
        self._lambda_version = -1
        self._lambda_ptr = 0

    @torch.jit.unused
    def _synced_statistics(self, pred: Tensor, label: Tensor, states: Optional[Tensor], mask: Optional[Tensor],
                           dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """mse, fr, fr_sd, fr_cv over the global batch of every rank in the process group.

        The sums each component needs — the (weighted) squared error and its weight, Σr², the
        per-neuron rate sums and the sample count — are packed into one float64 vector and
        all-reduced with an autograd-aware all-reduce (:func:`_all_reduce_sum`). Its backward
        all-reduces the gradient too, so each rank's gradient is world_size × its share; DDP's
        averaging then yields exactly the single-process gradient of the global-batch loss.
        """
        f64 = torch.float64
        zero = torch.zeros((), dtype=f64, device=pred.device)
        sq_err, weight, samples, sum_sq = zero, zero, zero, zero
        col = torch.zeros(self.n_hid, dtype=f64, device=pred.device)
        if self._on[0]:
            if mask is None:
                weight = torch.full((), float(pred.numel()), dtype=f64, device=pred.device)
                sq_err = mean_squared_error(pred, label).to(f64) * weight
            else:
                acc = torch.promote_types(accumulation_dtype(pred), accumulation_dtype(label))
                sq_err, weight = weighted_error_sums(pred.to(acc), label.to(acc), mask)
                sq_err, weight = sq_err.to(f64), weight.to(f64)
        if states is not None and self._need_states:
            samples = torch.full((), float(states.numel() // self.n_hid), dtype=f64, device=pred.device)
            sum_sq, sums = rate_sums(states, self._on[4], self._need_means)
            if self._need_means:
                col = sums
        packed = torch.cat([torch.stack([sq_err, weight, samples, sum_sq]), col])
        total = _all_reduce_sum(packed, self.process_group or torch.distributed.group.WORLD)
        mse = (total[0] / torch.where(total[1] == 0, torch.ones_like(total[1]), total[1])).to(dtype) \
            if self._on[0] else zero.to(dtype)
        fr = (total[3] / (total[2] * self.n_hid)).to(dtype) if self._on[4] else zero.to(dtype)
        fr_sd, fr_cv = zero.to(dtype), zero.to(dtype)
        if self._need_means:
            sd, cv = rate_sd_cv(total[4:] / total[2])
            fr_sd, fr_cv = sd.to(dtype), cv.to(dtype)
        return mse, fr, fr_sd, fr_cv

    @torch.jit.export
    def set_lambda(self, name: str, value: float) -> None:
        """Change an active component's λ at run time (annealing), from Python or C++.

        ``name`` is one of :attr:`component_names`; ``value`` must be finite in float32 and >= 0.
        Setting a component that was inactive at construction raises: it is not in the graph.
        """
        index = -1
        for i in range(len(self.component_names)):
            if self.component_names[i] == name:
                index = i
        if index < 0:
            raise ValueError("set_lambda: name must be one of {}, got '{}'".format(self.component_names, name))
        if not (value >= 0.0 and value <= self._lambda_max):
            raise ValueError("set_lambda: value for '{}' must be finite (in float32) and >= 0, got {}".format(
                name, value))
        if not self._on[index]:
            raise ValueError("set_lambda: component '{}' is inactive (its lambda was 0 at construction), "
                             "so it is never computed; build the loss with a non-zero lambda_{}".format(name, name))
        with torch.no_grad():
            self.lambdas[index] = value

    def extra_repr(self) -> str:
        return ", ".join(f"{n}={float(v):g}" for n, v in zip(LAMBDA_NAMES, self.lambdas) if float(v) != 0.0)

    def _check_mask(self, mask: Tensor, pred: Tensor) -> Tensor:
        """Validate ``mask`` (see the class docstring); returns it, poisoned with NaN where invalid in
        TorchScript on CUDA (which has no asynchronous assert that survives its optimiser)."""
        if mask.is_complex():
            raise TypeError("mask must be a real tensor (floating point, integer or bool), got dtype {}".format(
                dtype_name(mask)))
        if mask.shape != pred.shape and mask.shape != pred.shape[:-1]:
            raise ValueError("mask must have pred's shape {} or pred's shape without its last axis {}, got shape {}"
                             .format(shape_of(pred), shape_of(pred)[:-1], shape_of(mask)))
        if mask.device != pred.device:
            raise ValueError("mask must be on pred's device {}, got {}".format(str(pred.device), str(mask.device)))
        if mask.dtype == torch.bool or _compiling():
            return mask
        valid = torch.all((mask >= 0) & torch.isfinite(mask))
        if not mask.is_cuda:
            if not bool(valid):
                raise ValueError("mask must hold finite weights >= 0")
        elif torch.jit.is_scripting():
            weights = mask if mask.is_floating_point() else mask.to(torch.float64)  # keeps float64 exact
            mask = torch.where(valid, weights, torch.full_like(weights, math.nan))
        else:
            torch._assert_async(valid, "mask must hold finite weights >= 0")
        return mask

    def forward(self, pred: Tensor, label: Tensor, states: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Return ``(total, components)``; see the class docstring."""
        check_float_tensor(pred, "pred")
        check_float_tensor(label, "label")
        if pred.shape != label.shape:
            raise ValueError("pred and label must have the same shape, got pred {} and label {}".format(
                shape_of(pred), shape_of(label)))
        if label.device != pred.device:
            raise ValueError("label must be on pred's device {}, got {}".format(str(pred.device), str(label.device)))
        if states is not None:
            check_float_tensor(states, "states")
            if states.device != pred.device:
                raise ValueError("states must be on pred's device {}, got {}".format(
                    str(pred.device), str(states.device)))
            if states.dim() == 0 or states.size(-1) != self.n_hid:
                raise ValueError("states must have N_hid={} as its last dimension, got shape {}".format(
                    self.n_hid, shape_of(states)))
        elif self._need_states:
            raise ValueError("states is required when lambda_fr, lambda_fr_sd or lambda_fr_cv > 0, got None")
        if mask is not None:
            mask = self._check_mask(mask, pred)
        if _exporting():
            _exported_refusals(pred, states, mask)
        self._check_lambdas()

        w_in = self.model.recurrent_layer.input_layer.weight
        w_hid = self.model.recurrent_layer.hidden_layer.weight
        w_out = self.model.readout_layer.weight
        if (self._on[1] or self._on[2] or self._on[3]) and w_in.device != pred.device:
            raise ValueError("pred must be on the model's device {} when a weight penalty is active, got {}".format(
                str(w_in.device), str(pred.device)))
        dtype = torch.promote_types(torch.promote_types(accumulation_dtype(pred), accumulation_dtype(label)),
                                    accumulation_dtype(w_in))
        if states is not None:
            dtype = torch.promote_types(dtype, accumulation_dtype(states))
        zero = torch.zeros((), dtype=dtype, device=pred.device)
        mse, c_in, c_hid, c_out, fr, fr_sd, fr_cv = zero, zero, zero, zero, zero, zero, zero
        if self.sync_stats:
            if _compiling():
                raise RuntimeError(_SYNC_EAGER_ONLY)
            mse, fr, sd, cv = self._synced_statistics(pred, label, states, mask, dtype)
            if self._on[5]:
                fr_sd = sd
            if self._on[6]:
                fr_cv = cv
        elif self._on[0]:
            mse = mean_squared_error(pred, label, mask).to(dtype)
        if self._on[1]:
            c_in = mean_square(w_in).to(dtype)
        if self._on[2]:
            c_hid = mean_square(w_hid).to(dtype)
        if self._on[3]:
            c_out = mean_square(w_out).to(dtype)
        if states is not None and self._need_states and not self.sync_stats:
            sum_sq, sums = rate_sums(states, self._on[4], self._need_means)
            samples = states.numel() // self.n_hid
            if self._on[4]:
                fr = (sum_sq / states.numel()).to(dtype)
            if self._need_means:
                sd, cv = rate_sd_cv(sums / samples)
                if self._on[5]:
                    fr_sd = sd.to(dtype)
                if self._on[6]:
                    fr_cv = cv.to(dtype)
        raw = torch.stack([mse, c_in, c_hid, c_out, fr, fr_sd, fr_cv])
        components = raw * self.lambdas.to(device=raw.device, dtype=dtype)
        return components.sum(), components


def _readback_is_free(t: Tensor) -> bool:
    """Reading ``t`` back costs no host–device synchronisation: it lives on the CPU (on CUDA, or any
    other accelerator the model was moved to, it would)."""
    return t.device.type == "cpu"


@torch.jit.unused
def _exported_refusals(pred: Tensor, states: Optional[Tensor], mask: Optional[Tensor]) -> None:
    """Under torch.export: the checks above that read sizes or values as assertion nodes in the
    graph (``aten._assert_async``), since the traced sizes are symbols and the checks above pass
    once at trace time. The program's input guards refuse differing shapes and a wrong N_hid, not
    empty axes (a dynamic dimension may be 0 at run time whatever its declared minimum) nor mask
    weights. The ONNX exporter drops these nodes; the ONNX graph gets its own (graph_checks)."""
    torch._assert_async(torch.scalar_tensor(pred.numel()) > 0, "pred must not be empty")
    if states is not None:
        torch._assert_async(torch.scalar_tensor(states.numel()) > 0, "states must not be empty")
    if mask is not None and mask.dtype != torch.bool:
        torch._assert_async(torch.all((mask >= 0) & torch.isfinite(mask)), "mask must hold finite weights >= 0")


@torch.jit.unused
def _is_transformed(t: Tensor) -> bool:
    """``t`` is a torch.func wrapper (grad, vmap, ...): it has no storage of its own."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


@torch.jit.unused
def _eager_version(t: Tensor) -> int:
    """The version counter of ``t`` (bumped by every in-place write); TorchScript spells it ``t._version()``."""
    return t._version


def _refuse_inactive_lambdas(module: "RNNLoss", state_dict, prefix, local_metadata, strict, missing_keys,
                             unexpected_keys, error_msgs) -> None:
    """load_state_dict pre-hook: a non-zero λ for a component inactive in this loss is an error."""
    lambdas = state_dict.get(prefix + "lambdas")
    if lambdas is None:
        return
    if torch.is_tensor(lambdas) and lambdas.is_floating_point():
        state_dict[prefix + "lambdas"] = lambdas.to(torch.float64)  # the buffer stays float64 (assign=True too)
    for i, (name, value) in enumerate(zip(COMPONENT_NAMES, lambdas.tolist())):
        if value != 0.0 and not module._on[i]:
            raise ValueError(f"state_dict gives lambdas[{i}] ('{name}') = {value}, but component '{name}' is inactive "
                             f"in this loss (its lambda was 0 at construction); build the loss with a non-zero "
                             f"lambda_{name} to load it")


def _all_reduce_sum(t: Tensor, group) -> Tensor:
    """Autograd-aware all-reduce (sum): forward sums over ranks, backward sums the gradients.

    torch >= 2.12 registers autograd for the functional collectives (``all_reduce_backward``) and
    deprecates ``torch.distributed.nn.functional``; older torch (e.g. 2.11 on the GPU image) has
    only the latter.
    """
    try:
        from torch.distributed import _functional_collectives as fc
    except ImportError:  # pragma: no cover
        fc = None
    if fc is not None and hasattr(fc, "all_reduce_backward"):
        return fc.all_reduce(t, "sum", group) * 1  # * 1: a plain tensor, waited for, for what follows
    from torch.distributed import ReduceOp
    from torch.distributed.nn.functional import all_reduce
    return all_reduce(t, op=ReduceOp.SUM, group=group)


_SYNC_EAGER_ONLY = ("RNNLoss(sync_stats=True) runs eagerly only: its all-reduce of the statistics cannot be "
                    "scripted or exported; build the loss with sync_stats=False for TorchScript, ONNX or torch.export")


def _check_lambda(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    if value > FLOAT32_MAX:
        raise ValueError(f"{name} must be finite in float32 (at most {FLOAT32_MAX:.8g}), got {value!r}")
