r"""The composite CTRNN loss: task MSE, weight-size penalties and firing-rate regularisers.

Every formula lives in one function here with its math in the docstring; :class:`RNNLoss`
only validates its inputs, picks the active ones and applies the λ weights.
"""
import difflib
import math
from typing import Final, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import accumulation_dtype, check_float_tensor, shape_of
from .model import CTRNN

COMPONENT_NAMES: Tuple[str, ...] = ("mse", "in", "hid", "out", "fr", "fr_sd", "fr_cv")
LAMBDA_NAMES: Tuple[str, ...] = tuple("lambda_" + name for name in COMPONENT_NAMES)


def _tracing() -> bool:
    """True while torch.export (and so the ONNX exporter) traces: no data-dependent loops there."""
    if torch.jit.is_scripting():
        return False
    return torch.compiler.is_compiling()


def mean_square(x: Tensor) -> Tensor:
    r"""Mean of squares over every element: :math:`\frac{1}{n}\sum_k x_k^2`.

    Used for the weight penalties (:math:`\|W\|_F^2 / (\text{rows}\cdot\text{cols})`) and for
    ``fr`` (the mean of r², not the square of the mean). float16/bfloat16 accumulate in float32.

    For large ``x`` (the rates) the obvious ``x.square().mean()`` materialises a full-size
    temporary (fresh pages on the CPU) and its backward two more. Here instead:

    - the value is summed chunk by chunk along dim 0, one ``dot(chunk, chunk)`` per ~2^18
      elements on the CPU (no temporary; float32 error ~1e-8 per chunk; one dot per 2^30 on
      CUDA, whose tree reduction is accurate), the chunk sums added in float64;
    - the gradient :math:`2x/n` comes from a surrogate ``s = (2/n)·dot(x, x.detach())`` added as
      ``s − s.detach()`` — exactly 0 in value (and dropped where s is not finite, so an infinite
      rate gives inf, not inf − inf) and exactly :math:`2x/n` in gradient, one fused pass
      backward. It is built only when a gradient is wanted.

    Under torch.export / ONNX export (no data-dependent loops) the value is the sum of squared
    norms over the last axis instead; the parity suite checks that both give the same numbers,
    and that ONNX Runtime meets the 1e-5 accuracy bound at 10^7 elements.
    """
    acc = accumulation_dtype(x)
    n = x.numel()
    if x.dim() == 0:
        xa = x.to(acc)
        return xa * xa
    if _tracing():
        # Exported graphs: norms over the last axis (ONNX ReduceL2: one pass, no x² temporary),
        # then the sum of their squares. Reducing one axis at a time also keeps ONNX Runtime
        # accurate: its single flat ReduceMean of x² is off by 1e-3 at 16 M elements.
        norms = torch.linalg.vector_norm(x.to(acc), dim=-1)
        return (norms * norms).sum() / n
    # CPU: chunks of about 2^18 elements, one BLAS dot each (no temporary at all), short enough
    # that its float32 accumulation stays exact to ~1e-8 relative; chunk sums added in float64.
    # CUDA: cuBLAS reduces in a tree (error ~log n·ε), so one dot per 2^30 elements (one launch).
    chunk_elements = 1073741824 if x.is_cuda else 262144
    rows = max(1, chunk_elements // max(1, n // x.size(0)))
    xd = x.detach()
    parts: List[Tensor] = []
    for start in range(0, x.size(0), rows):
        chunk = xd.narrow(0, start, min(rows, x.size(0) - start)).reshape(-1).to(acc)
        parts.append(torch.dot(chunk, chunk))
    total = torch.stack(parts).to(torch.float64).sum()
    value = (total / n).to(acc)
    if torch.is_grad_enabled() and x.requires_grad:
        flat = x.reshape(-1).to(acc)
        surrogate = torch.dot(flat, flat.detach()) * (2.0 / n)
        # s − s.detach() is 0 for finite s; where s overflows, keep the value (inf stays inf).
        offset = surrogate - surrogate.detach()
        value = value + torch.where(torch.isfinite(surrogate), offset, torch.zeros_like(offset))
    return value


def mean_squared_error(pred: Tensor, label: Tensor) -> Tensor:
    r"""``mse``: :math:`\frac{1}{n}\sum_k (\hat y_k - y_k)^2` over every element (any shape)."""
    acc = torch.promote_types(accumulation_dtype(pred), accumulation_dtype(label))
    return F.mse_loss(pred.to(acc), label.to(acc))


def neuron_rate_sums(states: Tensor) -> Tuple[Tensor, int]:
    r"""Per-neuron rate sums :math:`\sum_{s} r_{s,i}` over all M samples, and M.

    ``states`` is (…, N_hid); every leading index (batch, time, …) is a sample. One reduction
    over the sample axis; its backward is a broadcast view, not a materialised tensor.
    """
    r = states.to(accumulation_dtype(states))
    r2 = r.reshape(-1, r.size(-1))
    return r2.sum(dim=0), r2.size(0)


def neuron_mean_rates(states: Tensor) -> Tensor:
    r"""Per-neuron mean rate :math:`\bar r_i = \frac{1}{M}\sum_{s} r_{s,i}` over all M samples."""
    sums, samples = neuron_rate_sums(states)
    # sum, then divide the N-vector: mean's backward would divide a full-size broadcast instead.
    return sums / samples


def rate_sd_cv(mean_rates: Tensor) -> Tuple[Tensor, Tensor]:
    r"""``fr_sd`` and ``fr_cv`` from the per-neuron means :math:`\bar r_i` (i = 1 … N_hid).

    .. math::
        \mu = \frac{1}{N}\sum_i \bar r_i, \qquad
        \sigma = \sqrt{\frac{1}{N}\sum_i (\bar r_i - \mu)^2}, \qquad
        \mathrm{CV} = \sigma / \mu

    μ, the mean of the per-neuron means, equals the mean of all rates. σ is the population SD
    (divide by N, not N − 1) and is computed from the deviations themselves, so a large mean
    with a tiny spread loses no precision (no E[x²] − E[x]² cancellation).

    Edge cases:
        - σ = 0 (every neuron has the same mean rate, e.g. all silent): σ = 0 and CV = 0 with
          zero gradients. The square root's infinite slope at 0 is never evaluated.
        - σ > 0 and μ = 0: the CV is undefined; returns +inf (and a zero gradient).
        - NaN or ±inf in the rates: σ and CV are NaN. The σ = 0 guard tests ``var == 0``,
          which is false for NaN, so it never turns a NaN into 0.
    """
    mu = mean_rates.mean()
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

    ``forward(pred, label, states=None) -> (total, components)`` where ``components`` has length 7
    in the fixed order of :attr:`component_names` (λ already applied) and ``total`` is
    ``components.sum()``:

    ====  ========  ==========================================================================
    0     mse       λ_mse · mean((pred − label)²) over every element
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
    The λ values are the float buffer ``lambdas`` (shape [7]); change it at run time to anneal
    an active component.

    Shape:
        - pred, label: any shape, identical (no broadcasting); commonly (T, B, N_out).
        - states: (…, N_hid), every leading index a sample; required when λ_fr, λ_fr_sd or
          λ_fr_cv > 0.
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
        self.register_buffer("lambdas", torch.tensor([float(v) for v in values], dtype=torch.float32))

    @property
    def active(self) -> List[str]:
        """Names of the components computed by this loss (fixed at construction)."""
        return [name for name, on in zip(COMPONENT_NAMES, self._on) if on]

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: refuse clearly instead of failing on a ProcessGroup.
        if self.sync_stats:
            raise RuntimeError(_SYNC_EAGER_ONLY)
        return self

    @torch.jit.unused
    def _synced_statistics(self, pred: Tensor, label: Tensor, states: Optional[Tensor],
                           dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """mse, fr, fr_sd, fr_cv over the global batch of every rank in the process group.

        The sums each component needs — squared error and its count, Σr², the per-neuron rate
        sums and the sample count — are packed into one float64 vector and all-reduced with an
        autograd-aware all-reduce (:func:`_all_reduce_sum`). Its backward all-reduces
        the gradient too, so each rank's gradient is world_size × its share; DDP's averaging
        then yields exactly the single-process gradient of the global-batch loss.
        """
        f64 = torch.float64
        zero = torch.zeros((), dtype=f64, device=pred.device)
        sq_err, count, samples, sum_sq = zero, zero, zero, zero
        col = torch.zeros(self.n_hid, dtype=f64, device=pred.device)
        if self._on[0]:
            sq_err = mean_squared_error(pred, label).to(f64) * pred.numel()
            count = torch.full((), float(pred.numel()), dtype=f64, device=pred.device)
        if states is not None and self._need_states:
            samples = torch.full((), float(states.numel() // self.n_hid), dtype=f64, device=pred.device)
            if self._need_means:
                col = neuron_rate_sums(states)[0].to(f64)
            if self._on[4]:
                sum_sq = mean_square(states).to(f64) * states.numel()
        packed = torch.cat([torch.stack([sq_err, count, samples, sum_sq]), col])
        total = _all_reduce_sum(packed, self.process_group or torch.distributed.group.WORLD)
        mse = (total[0] / total[1]).to(dtype) if self._on[0] else zero.to(dtype)
        fr = (total[3] / (total[2] * self.n_hid)).to(dtype) if self._on[4] else zero.to(dtype)
        fr_sd, fr_cv = zero.to(dtype), zero.to(dtype)
        if self._need_means:
            sd, cv = rate_sd_cv(total[4:] / total[2])
            fr_sd, fr_cv = sd.to(dtype), cv.to(dtype)
        return mse, fr, fr_sd, fr_cv

    @torch.jit.export
    def set_lambda(self, name: str, value: float) -> None:
        """Change an active component's λ at run time (annealing), from Python or C++.

        ``name`` is one of :attr:`component_names`; ``value`` must be finite and >= 0. Setting a
        component that was inactive at construction raises: it is not in the graph.
        """
        index = -1
        for i in range(len(self.component_names)):
            if self.component_names[i] == name:
                index = i
        if index < 0:
            raise ValueError("set_lambda: name must be one of {}, got '{}'".format(self.component_names, name))
        if not math.isfinite(value) or value < 0.0:
            raise ValueError("set_lambda: value for '{}' must be finite and >= 0, got {}".format(name, value))
        if not self._on[index]:
            raise ValueError("set_lambda: component '{}' is inactive (its lambda was 0 at construction), "
                             "so it is never computed; build the loss with a non-zero lambda_{}".format(name, name))
        with torch.no_grad():
            self.lambdas[index] = value

    def extra_repr(self) -> str:
        return ", ".join(f"{n}={float(v):g}" for n, v in zip(LAMBDA_NAMES, self.lambdas) if float(v) != 0.0)

    def forward(self, pred: Tensor, label: Tensor, states: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
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
            if _tracing():
                raise RuntimeError(_SYNC_EAGER_ONLY)
            mse, fr, sd, cv = self._synced_statistics(pred, label, states, dtype)
            if self._on[5]:
                fr_sd = sd
            if self._on[6]:
                fr_cv = cv
        elif self._on[0]:
            mse = mean_squared_error(pred, label).to(dtype)
        if self._on[1]:
            c_in = mean_square(w_in).to(dtype)
        if self._on[2]:
            c_hid = mean_square(w_hid).to(dtype)
        if self._on[3]:
            c_out = mean_square(w_out).to(dtype)
        if states is not None and not self.sync_stats:
            # Both paths send states a gradient: fr a dense one, the spread a broadcast one, which
            # autograd adds out of place whatever the order (measured; see BENCHMARKS.md).
            if self._need_means:
                sd, cv = rate_sd_cv(neuron_mean_rates(states))
                if self._on[5]:
                    fr_sd = sd.to(dtype)
                if self._on[6]:
                    fr_cv = cv.to(dtype)
            if self._on[4]:
                fr = mean_square(states).to(dtype)
        raw = torch.stack([mse, c_in, c_hid, c_out, fr, fr_sd, fr_cv])
        components = raw * self.lambdas.to(device=raw.device, dtype=dtype)
        return components.sum(), components


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
