"""RNNLoss: the composite CTRNN loss as a module — validation, the active set, λ; the math is in
:mod:`rnnloss.terms` (the formulas) and :mod:`rnnloss.ratesums` (how the rate sums are taken)."""
import difflib
import math
from typing import Dict, Final, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .model import CTRNN
from .ratesums import accumulation_dtype
from .rules import (COMPONENT_NAMES, LAMBDA_NAMES, Rule, Term, check_float_tensor, check_lambda, dtype_name, error,
                    float32_max, shape_of)
from .terms import Flags, Stats, compiling, components, exporting, statistics


class RNNLoss(nn.Module):
    r"""Composite loss of a :class:`~rnnloss.CTRNN`: task error, weight penalties, firing-rate terms.

    ``forward(pred, label, states=None, mask=None) -> (total, components)``; ``components`` has the
    seven entries of :attr:`component_names`, each λ-weighted, and ``total = components.sum()``:

    ====  ========  ===================================================================
    0     mse       λ_mse · Σ w (pred − label)² / Σ w   (w = 1 without a mask: the mean)
    1     in        λ_in · ‖W_in‖²_F / (N_in · N_hid)
    2     hid       λ_hid · ‖W_hid‖²_F / N_hid²
    3     out       λ_out · ‖W_out‖²_F / (N_out · N_hid)
    4     fr        λ_fr · mean of r² over every sample and neuron
    5     fr_sd     λ_fr_sd · σ, the population SD of the per-neuron mean rates r̄_i
    6     fr_cv     λ_fr_cv · σ / μ, μ the mean of all rates
    ====  ========  ===================================================================

    (the formulas: :mod:`rnnloss.terms`). The weights are the live parameters of ``model``, held as
    the submodule ``model``. A component whose λ is 0 at construction is *inactive*: never
    computed, its entry exactly 0; the active set is fixed, which keeps exported graphs static.

    λ live in the float64 buffer ``lambdas`` (shape [7]; moves with ``.to(device)``, stays float64
    under ``.half()``, saved in ``state_dict``; :meth:`set_lambda` anneals). They are checked where they
    are written — the constructor, :meth:`set_lambda`, ``load_state_dict``, the exports — and by
    ``forward``: on the CPU before computing, elsewhere as a device-side assertion (no host–device
    synchronisation; a scripted module, where TorchScript drops those, returns NaN instead).

    With ``sync_stats=True`` the sums behind mse, fr, fr_sd and fr_cv are all-reduced over
    ``process_group`` (default: the world), so every rank computes the global batch's loss (eager only).
    Otherwise the module scripts (``torch.jit.script``) and compiles without graph breaks
    (``torch.compile(loss, fullgraph=True)``: stock operations, which Inductor fuses; there the checks of
    mask weights and λ values are graph assertions, raising RuntimeError with the rule's message).

    Shape:
        - pred, label: any shape, identical (no broadcasting); commonly (T, B, N_out).
        - states: (…, N_hid), every leading index a sample; required when λ_fr, λ_fr_sd or λ_fr_cv > 0.
        - mask: pred's shape, or pred's shape without its last axis (one weight per sample); finite
          weights >= 0 (floating, integer or bool). It weights mse only; pass ``states[valid]`` to
          restrict the rate terms.
        - total: 0-dim; components: (7,). float16/bfloat16 give float32; else the inputs' dtype.

    Example::

        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = CTRNN((3, 16, 2))
        >>> loss_fn = RNNLoss(model, lambda_mse=1.0, lambda_fr=0.01)
        >>> output, states = model(torch.randn(20, 4, 3))
        >>> total, components = loss_fn(output, torch.zeros_like(output), states)
        >>> loss_fn.named(components)["fr"] > 0
        True
        >>> total.backward()
    """

    __jit_unused_properties__ = ["active"]
    component_names: List[str]
    _on: Final[Flags]
    _inactive: List[int]
    n_hid: Final[int]
    sync_stats: Final[bool]

    def __init__(self, model: CTRNN, *, lambda_mse: float = 1.0, lambda_in: float = 0.0, lambda_hid: float = 0.0,
                 lambda_out: float = 0.0, lambda_fr: float = 0.0, lambda_fr_sd: float = 0.0, lambda_fr_cv: float = 0.0,
                 sync_stats: bool = False, process_group=None, **unknown: float) -> None:
        super().__init__()
        if unknown:
            name = sorted(unknown)[0]
            valid = list(LAMBDA_NAMES) + ["sync_stats", "process_group"]
            close = difflib.get_close_matches(name, valid, n=1)
            raise error(Rule.UNKNOWN_KEYWORD, repr(name), f" (did you mean {close[0]!r}?)" if close else "", valid)
        if not isinstance(sync_stats, bool):
            raise TypeError(f"sync_stats must be a bool, got {sync_stats!r}")
        if process_group is not None and not sync_stats:
            raise ValueError("process_group is only used with sync_stats=True, got sync_stats=False")
        if not isinstance(model, CTRNN):
            raise error(Rule.MODEL_TYPE, type(model).__name__)
        values = (lambda_mse, lambda_in, lambda_hid, lambda_out, lambda_fr, lambda_fr_sd, lambda_fr_cv)
        for name, value in zip(LAMBDA_NAMES, values):
            check_lambda(name, _real(name, value), True, name)
        self.model = model
        self.sync_stats = sync_stats
        self.process_group = process_group
        self.component_names = list(COMPONENT_NAMES)
        self.n_hid = model.n_hid
        self._on = tuple(float(v) > 0.0 for v in values)  # type: ignore[assignment]
        self._inactive = [i for i, on in enumerate(self._on) if not on]
        # On the device of the input weights (what forward checks pred against); a meta model keeps
        # real values on the CPU (to_empty, then load_state_dict).
        device = model.recurrent_layer.input_layer.weight.device
        device = torch.device("cpu") if device.type == "meta" else device
        self.register_buffer("lambdas", torch.tensor([float(v) for v in values], dtype=torch.float64, device=device))
        self._register_load_state_dict_pre_hook(_check_loaded_lambdas, with_module=True)

    @property
    def active(self) -> List[str]:
        """Names of the components this loss computes (fixed at construction)."""
        return [name for name, on in zip(COMPONENT_NAMES, self._on) if on]

    def named(self, components: Tensor) -> Dict[str, float]:
        """``components`` as ``{name: value}``, for logging (``loss_fn.named(components)``)."""
        return {name: float(v) for name, v in zip(self.component_names, components.detach().cpu().tolist())}

    def extra_repr(self) -> str:
        return ", ".join(f"{n}={float(v):g}" for n, v in zip(LAMBDA_NAMES, self.lambdas) if float(v) != 0.0)

    def __prepare_scriptable__(self):  # torch.jit.script calls this first: refuse clearly
        if self.sync_stats:
            raise error(Rule.SYNC_EAGER_ONLY)
        return self

    def _apply(self, fn, recurse=True):
        # .float(), .half(), .to(dtype) would round λ: the buffer keeps float64 and follows the device.
        lambdas = self.lambdas
        super()._apply(fn, recurse)
        device = self.lambdas.device
        if lambdas.is_meta and device.type != "meta":  # to_empty() after .to("meta"): NaN until a state loads
            self._buffers["lambdas"] = torch.full((7,), math.nan, dtype=torch.float64, device=device)
        else:
            self._buffers["lambdas"] = lambdas.to(device=device)
        return self

    @torch.jit.export
    def set_lambda(self, name: str, value: Union[float, int, bool]) -> None:
        """Change an active component's λ at run time (annealing), from Python or C++; ``value`` an int or
        float, finite in float32 and >= 0 (an inactive component's λ stays 0: it is not in the graph)."""
        index = -1
        for i in range(len(self.component_names)):
            if self.component_names[i] == name:
                index = i
        if index < 0:
            raise ValueError(Rule.LAMBDA_NAME.value.format(", ".join(self.component_names), name))
        if not torch.jit.is_scripting():  # what TorchScript's argument parser refuses, refused here too
            value = _real("set_lambda value", value)  # (an int beyond float64: inf, refused below)
        if isinstance(value, bool):
            raise TypeError(Rule.LAMBDA_TYPE.value.format("set_lambda value", "a bool"))
        elif isinstance(value, int):
            v = float(value)
        else:  # this order of branches is the one a saved TorchScript module loads back
            v = value
        check_lambda("lambda_" + name, v, self._on[index], name)
        with torch.no_grad():
            self.lambdas[index].fill_(v)  # fill_ takes the float64 value; `lambdas[i] = v` rounds via float32

    @torch.jit.export
    def check_lambdas(self) -> None:
        """Refuse (ValueError) a λ buffer that is not float64 [7] or holds a value no λ may have; reads
        the values back (a host–device synchronisation off the CPU: the exports call it, forward does not)."""
        lam = self.lambdas
        if lam.dtype != torch.float64 or lam.dim() != 1 or lam.size(0) != 7:
            raise ValueError(Rule.LAMBDAS_BUFFER.value.format(dtype_name(lam), shape_of(lam)))
        values: List[float] = lam.tolist()
        for i in range(len(values)):
            name = self.component_names[i]
            check_lambda("lambdas[{}] ('{}')".format(i, name), values[i], self._on[i], name)

    def forward(self, pred: Tensor, label: Tensor, states: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Return ``(total, components)``; see the class docstring."""
        check_inputs(pred, label, states, mask, self.n_hid, self._on, self.model.recurrent_layer.input_layer.weight)
        if mask is not None:
            if not mask.is_floating_point():  # integer or bool weights
                mask = mask.to(accumulation_dtype(pred))
            valid = torch.all((mask >= 0) & torch.isfinite(mask))
            if mask.device.type == "cpu" and not compiling():
                if not bool(valid):
                    raise ValueError(Rule.MASK_WEIGHTS.value)
            else:
                mask = _refuse_on_device(valid, Rule.MASK_WEIGHTS.value, mask)
        lam = self.lambdas
        if lam.device.type == "cpu" and not compiling():
            self.check_lambdas()
        else:
            lam = checked_on_device(lam, self._inactive)
        need_sq = self._on[Term.FR.value]
        need_col = self._on[Term.FR_SD.value] or self._on[Term.FR_CV.value]
        stats = statistics(pred, label, states, mask, self._on[Term.MSE.value], need_sq, need_col)
        if self.sync_stats:
            stats = all_reduced(stats, self.n_hid, self.process_group)
        model = self.model
        w_in, w_hid = model.recurrent_layer.input_layer.weight, model.recurrent_layer.hidden_layer.weight
        dtype = torch.promote_types(torch.promote_types(accumulation_dtype(pred), accumulation_dtype(label)),
                                    accumulation_dtype(w_in))
        if states is not None:
            dtype = torch.promote_types(dtype, accumulation_dtype(states))
        raw = components(stats, w_in, w_hid, model.readout_layer.weight, self._on, dtype)
        weighted = raw * lam.to(device=raw.device, dtype=dtype)
        return weighted.sum(), weighted

@torch.jit.unused
def _real(name: str, value) -> float:
    """``value`` as a float if it is an int or a float (not a bool), else LAMBDA_TYPE."""
    if isinstance(value, bool):
        raise error(Rule.LAMBDA_TYPE, name, "a bool")
    if not isinstance(value, (int, float)):
        raise error(Rule.LAMBDA_TYPE, name, type(value).__name__)
    try:
        return float(value)
    except OverflowError:  # an int beyond float64
        return math.inf


def checked_on_device(lam: Tensor, inactive: List[int]) -> Tensor:
    """The λ buffer off the CPU (or while torch.compile traces): its dtype and shape refused at once, its
    values by a device-side assertion (no host–device synchronisation); an export bakes λ in, checked."""
    if lam.dtype != torch.float64 or lam.dim() != 1 or lam.size(0) != 7:
        raise ValueError(Rule.LAMBDAS_BUFFER.value.format(dtype_name(lam), shape_of(lam)))
    if exporting():
        return lam
    ok = (lam >= 0.0) & (lam <= float32_max())
    for i in inactive:
        ok[i] = ok[i] & (lam[i] == 0.0)
    return _refuse_on_device(ok.all(), Rule.LAMBDAS_VALUES.value, lam)


def check_inputs(pred: Tensor, label: Tensor, states: Optional[Tensor], mask: Optional[Tensor], n_hid: int,
                 on: Flags, w_in: Tensor) -> None:
    """The rules forward's inputs must meet, before anything is computed (eager and TorchScript alike)."""
    check_float_tensor(pred, "pred")
    check_float_tensor(label, "label")
    traced = exporting()  # sizes are symbols then: the exported graphs check them themselves
    if not traced and pred.shape != label.shape:
        raise ValueError(Rule.LABEL_SHAPE.value.format(shape_of(pred), shape_of(label)))
    if label.device != pred.device:
        raise ValueError(Rule.DEVICE.value.format("label", "pred", str(pred.device), str(label.device)))
    if states is not None:
        check_float_tensor(states, "states")
        if states.device != pred.device:
            raise ValueError(Rule.DEVICE.value.format("states", "pred", str(pred.device), str(states.device)))
        if states.dim() == 0 or (not traced and states.size(-1) != n_hid):
            raise ValueError(Rule.STATES_LAST_DIM.value.format(n_hid, shape_of(states)))
    elif on[Term.FR.value] or on[Term.FR_SD.value] or on[Term.FR_CV.value]:
        raise ValueError(Rule.STATES_MISSING.value)
    if mask is not None:
        if mask.is_complex():
            raise TypeError(Rule.MASK_DTYPE.value.format(dtype_name(mask)))
        if not traced and mask.shape != pred.shape and mask.shape != pred.shape[:-1]:
            raise ValueError(Rule.MASK_SHAPE.value.format(shape_of(pred), shape_of(pred)[:-1], shape_of(mask)))
        if mask.device != pred.device:
            raise ValueError(Rule.DEVICE.value.format("mask", "pred", str(pred.device), str(mask.device)))
    weights_on = on[Term.IN.value] or on[Term.HID.value] or on[Term.OUT.value]
    if weights_on and w_in.device != pred.device:
        raise ValueError(Rule.DEVICE.value.format("pred", "the model", str(w_in.device), str(pred.device)))


@torch.jit.unused
def all_reduced(stats: Stats, n_hid: int, group) -> Stats:
    """The statistics summed over every rank of ``group``, through an autograd-aware all-reduce: its backward
    all-reduces the gradient too, so after DDP's averaging each rank holds the single-process gradient of the
    global batch's loss."""
    if compiling():
        raise error(Rule.SYNC_EAGER_ONLY)
    if group is None and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise error(Rule.SYNC_NO_GROUP)
    f64 = torch.float64
    col = stats.col if stats.col.dim() == 1 else stats.col.new_zeros(n_hid)
    packed = torch.cat([torch.stack([stats.sq_err.to(f64), stats.weight.to(f64), stats.samples, stats.sum_sq]), col])
    total = _all_reduce_sum(packed, group or torch.distributed.group.WORLD)
    return Stats(total[0], total[1], total[2], total[3], total[4:])


def _refuse_on_device(ok: Tensor, message: str, t: Tensor) -> Tensor:
    """``t`` after a device-side assertion of ``ok`` (no host–device synchronisation; a graph node under
    torch.compile and torch.export); TorchScript drops those, so there ``t`` becomes NaN where ``ok`` fails."""
    if torch.jit.is_scripting():
        return torch.where(ok, t, torch.full_like(t, math.nan))
    torch._assert_async(ok, message)
    return t


def _check_loaded_lambdas(module: RNNLoss, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: the loaded λ are checked like any other write; kept float64."""
    lambdas = state_dict.get(prefix + "lambdas")
    if lambdas is None:
        return
    if torch.is_tensor(lambdas) and lambdas.is_floating_point():
        state_dict[prefix + "lambdas"] = lambdas = lambdas.to(torch.float64)
    for i, (name, value) in enumerate(zip(COMPONENT_NAMES, lambdas.tolist())):
        check_lambda(f"state_dict's lambdas[{i}] ('{name}')", value, module._on[i], name)


def _all_reduce_sum(t: Tensor, group) -> Tensor:
    """Autograd-aware all-reduce (sum). torch >= 2.12 differentiates the functional collectives; older
    torch (2.11 on the GPU image) has ``torch.distributed.nn.functional`` only."""
    from torch.distributed import _functional_collectives as fc
    if hasattr(fc, "all_reduce_backward"):
        return fc.all_reduce(t, "sum", group) * 1  # * 1: a plain tensor, waited for
    from torch.distributed.nn.functional import all_reduce
    return all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=group)
