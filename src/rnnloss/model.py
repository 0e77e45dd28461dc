"""The continuous-time RNN that :class:`rnnloss.RNNLoss` reads.

Dynamics (Euler step of τ dv/dt = −v + W_hid r + b_hid + W_in u + b_in, α = dt / τ)::

    v_{t+1} = (1 − α) v_t + α (W_hid r_t + b_hid + W_in u_t + b_in + σ_pre ξ_t)
    r_{t+1} = f(v_{t+1}) + σ_post η_t
    output_t = W_out r_t + b_out

with v_0 = ``init_state`` (or 0) and r_0 = f(v_0). ξ, η are standard normal noise, drawn only in
training mode. ``states`` holds r_1 … r_T (the rates after each step) and ``output`` the readout
of each of them.

Parameter names follow nn4n's, so its state dicts load: ``recurrent_layer.input_layer.weight``
(N_hid × N_in), ``recurrent_layer.hidden_layer.weight`` (N_hid × N_hid),
``readout_layer.weight`` (N_out × N_hid), and the matching ``.bias`` entries.
"""
import math
from typing import Final, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_float_tensor, dtype_name, shape_of

ACTIVATIONS = ("relu", "tanh", "sigmoid", "softplus", "retanh")
WEIGHT_INITS = ("uniform", "normal", "zero")
LAYERS = ("input", "hidden", "readout")

MaskArg = Optional[Union[Tensor, Sequence[Optional[Tensor]]]]


def _project(weight: Tensor, sparsity: Tensor, has_sparsity: bool, sign: Tensor, has_sign: bool) -> None:
    """Project ``weight`` in place onto its constraint set (call under ``no_grad``).

    ``sparsity`` is 0 where a synapse is absent; ``sign`` is +1 (excitatory presynaptic neuron:
    weight ≥ 0), −1 (inhibitory: weight ≤ 0) or 0 (unconstrained) for every entry of ``weight``.
    """
    if has_sparsity:
        weight.mul_(sparsity)
    if has_sign:
        w = torch.where(sign > 0, weight.clamp(min=0.0), weight)
        w = torch.where(sign < 0, w.clamp(max=0.0), w)
        weight.copy_(w)


class RecurrentLayer(nn.Module):
    """Holds the input and hidden weights under nn4n's names (``recurrent_layer.*``)."""

    def __init__(self, n_in: int, n_hid: int, bias_in: bool, bias_hid: bool) -> None:
        super().__init__()
        self.input_layer = nn.Linear(n_in, n_hid, bias=bias_in)
        self.hidden_layer = nn.Linear(n_hid, n_hid, bias=bias_hid)

    def forward(self, r: Tensor) -> Tensor:  # pragma: no cover - CTRNN drives the layers
        return self.hidden_layer(r)


class CTRNN(nn.Module):
    r"""Continuous-time recurrent network (see the module docstring for the dynamics).

    Args:
        dims: ``(N_in, N_hid, N_out)``, positive integers.
        tau, dt: time constant and step (same unit); α = dt / τ must lie in (0, 1].
        activation: one of ``relu``, ``tanh``, ``sigmoid``, ``softplus``, ``retanh``
            (max(tanh(x), 0)).
        preact_noise, postact_noise: σ_pre and σ_post, ≥ 0; used in training mode only.
        biases: ``True``/``False`` for all three layers, or a sequence of three bools
            (input, hidden, readout).
        weights: initialisation, ``"uniform"`` (U(±1/√fan_in)), ``"normal"`` (N(0, 1/fan_in))
            or ``"zero"``, for all layers or as a sequence of three.
        sparsity_masks: ``None`` or a sequence (input, hidden, readout) of ``None`` or tensors
            shaped like the weight (out × in); 0 marks an absent synapse.
        ei_masks: ``None`` or a sequence (input, hidden, readout) of ``None`` or sign tensors:
            either 1-D of length ``in_features`` (one sign per presynaptic neuron — Dale's law)
            or shaped like the weight; +1 excitatory, −1 inhibitory, 0 unconstrained.
        batch_first: inputs and outputs are (B, T, ·) instead of the default (T, B, ·).

    Shape:
        - x: (T, B, N_in), or (B, T, N_in) with ``batch_first``; init_state: (B, N_hid).
        - output: (T, B, N_out); states: (T, B, N_hid) (batch first likewise).

    Masks are applied by :meth:`enforce_constraints`, which runs at construction and which a
    training loop calls after each optimizer step; ``forward`` never changes the parameters.
    """

    alpha: Final[float]
    activation: Final[str]
    preact_noise: Final[float]
    postact_noise: Final[float]
    batch_first: Final[bool]
    n_in: Final[int]
    n_hid: Final[int]
    n_out: Final[int]
    _sparse_in: Final[bool]
    _sparse_hid: Final[bool]
    _sparse_out: Final[bool]
    _sign_in: Final[bool]
    _sign_hid: Final[bool]
    _sign_out: Final[bool]

    def __init__(
        self,
        dims: Sequence[int] = (1, 100, 1),
        *,
        tau: float = 100.0,
        dt: float = 10.0,
        activation: str = "relu",
        preact_noise: float = 0.0,
        postact_noise: float = 0.0,
        biases: Union[bool, Sequence[bool]] = True,
        weights: Union[str, Sequence[str]] = "uniform",
        sparsity_masks: MaskArg = None,
        ei_masks: MaskArg = None,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        n_in, n_hid, n_out = _check_dims(dims)
        for name, value in (("tau", tau), ("dt", dt)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if dt > tau:
            raise ValueError(f"dt must not exceed tau (alpha = dt / tau must be <= 1), got dt={dt!r}, tau={tau!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        for name, value in (("preact_noise", preact_noise), ("postact_noise", postact_noise)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first must be a bool, got {batch_first!r}")
        bias_flags = _per_layer(biases, "biases", bool)
        inits = _per_layer(weights, "weights", str)
        for layer, init in zip(LAYERS, inits):
            if init not in WEIGHT_INITS:
                raise ValueError(f"weights for the {layer} layer must be one of {list(WEIGHT_INITS)}, got {init!r}")

        self.n_in, self.n_hid, self.n_out = n_in, n_hid, n_out
        self.tau, self.dt = float(tau), float(dt)
        self.alpha = float(dt) / float(tau)
        self.activation = activation
        self.preact_noise = float(preact_noise)
        self.postact_noise = float(postact_noise)
        self.batch_first = batch_first

        self.recurrent_layer = RecurrentLayer(n_in, n_hid, bias_flags[0], bias_flags[1])
        self.readout_layer = nn.Linear(n_hid, n_out, bias=bias_flags[2])
        linears = (self.recurrent_layer.input_layer, self.recurrent_layer.hidden_layer, self.readout_layer)
        with torch.no_grad():
            for lin, init in zip(linears, inits):
                _init_linear(lin, init)

        sparsity = _masks(sparsity_masks, "sparsity_masks", linears, allow_vector=False)
        signs = _masks(ei_masks, "ei_masks", linears, allow_vector=True)
        for layer, lin, mask in zip(LAYERS, linears, sparsity):
            self._register_mask(f"sparsity_{layer}", mask, torch.ones_like(lin.weight))
        for layer, lin, mask in zip(LAYERS, linears, signs):
            if mask is not None and not bool(torch.all((mask == 1) | (mask == -1) | (mask == 0))):
                raise ValueError(f"ei_masks for the {layer} layer must hold only +1, -1 and 0")
            self._register_mask(f"sign_{layer}", mask, torch.zeros_like(lin.weight))
        self._sparse_in, self._sparse_hid, self._sparse_out = (m is not None for m in sparsity)
        self._sign_in, self._sign_hid, self._sign_out = (m is not None for m in signs)
        with torch.no_grad():
            # Start on the right side of Dale's law instead of zeroing half of the weights.
            for lin, mask in zip(linears, signs):
                if mask is not None:
                    lin.weight.copy_(torch.where(mask != 0, lin.weight.abs() * mask, lin.weight))
        self.enforce_constraints()

    def _register_mask(self, name: str, mask: Optional[Tensor], default: Tensor) -> None:
        # A given mask is part of the model and travels in state_dict; an absent one is a
        # non-persistent placeholder, so plain models keep nn4n's state-dict keys exactly.
        if mask is None:
            self.register_buffer(name, default, persistent=False)
        else:
            self.register_buffer(name, mask.to(default.dtype).clone(), persistent=True)

    @torch.jit.export
    def enforce_constraints(self) -> None:
        """Project the weights in place: zero absent synapses, clamp signs to the E/I masks."""
        with torch.no_grad():
            _project(self.recurrent_layer.input_layer.weight, self.sparsity_input, self._sparse_in,
                     self.sign_input, self._sign_in)
            _project(self.recurrent_layer.hidden_layer.weight, self.sparsity_hidden, self._sparse_hid,
                     self.sign_hidden, self._sign_hid)
            _project(self.readout_layer.weight, self.sparsity_readout, self._sparse_out,
                     self.sign_readout, self._sign_out)

    def _activate(self, v: Tensor) -> Tensor:
        if self.activation == "relu":
            return torch.relu(v)
        if self.activation == "tanh":
            return torch.tanh(v)
        if self.activation == "sigmoid":
            return torch.sigmoid(v)
        if self.activation == "softplus":
            return F.softplus(v)
        return torch.relu(torch.tanh(v))  # retanh

    def forward(self, x: Tensor, init_state: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Run the network over ``x``; returns ``(output, states)`` (see the class docstring)."""
        check_float_tensor(x, "x")
        w_in = self.recurrent_layer.input_layer.weight
        layout = "(B, T, N_in)" if self.batch_first else "(T, B, N_in)"
        if x.dim() != 3 or x.size(2) != self.n_in:
            raise ValueError("x must have shape {} with N_in={}, got shape {}".format(layout, self.n_in, shape_of(x)))
        if x.dtype != w_in.dtype:
            raise TypeError("x must have the model's dtype {}, got dtype {}".format(dtype_name(w_in), dtype_name(x)))
        if self.batch_first:
            x = x.transpose(0, 1)
        steps, batch = x.size(0), x.size(1)
        if init_state is None:
            v = torch.zeros(batch, self.n_hid, dtype=x.dtype, device=x.device)
        else:
            check_float_tensor(init_state, "init_state")
            if init_state.dim() != 2 or init_state.size(0) != batch or init_state.size(1) != self.n_hid:
                raise ValueError("init_state must have shape [B, N_hid] = {}, got shape {}".format(
                    [batch, self.n_hid], shape_of(init_state)))
            v = init_state.to(x.dtype)
        # The input drive and both biases for every step in one matmul.
        drive = F.linear(x, w_in, self.recurrent_layer.input_layer.bias)
        b_hid = self.recurrent_layer.hidden_layer.bias
        if b_hid is not None:
            drive = drive + b_hid
        w_hid = self.recurrent_layer.hidden_layer.weight
        noisy_pre = self.training and self.preact_noise > 0.0
        noisy_post = self.training and self.postact_noise > 0.0
        r = self._activate(v)
        rates = []
        for t in range(steps):
            pre = torch.addmm(drive[t], r, w_hid.t())
            if noisy_pre:
                pre = pre + self.preact_noise * torch.randn_like(pre)
            v = (1.0 - self.alpha) * v + self.alpha * pre
            r = self._activate(v)
            if noisy_post:
                r = r + self.postact_noise * torch.randn_like(r)
            rates.append(r)
        states = torch.stack(rates)
        output = F.linear(states, self.readout_layer.weight, self.readout_layer.bias)
        if self.batch_first:
            return output.transpose(0, 1), states.transpose(0, 1)
        return output, states


def _check_dims(dims: Sequence[int]) -> Tuple[int, int, int]:
    try:
        values = tuple(dims)
    except TypeError:
        raise TypeError(f"dims must be a sequence (N_in, N_hid, N_out) of three positive ints, got {dims!r}") from None
    if len(values) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in values):
        raise ValueError(f"dims must be a sequence (N_in, N_hid, N_out) of three positive ints, got {dims!r}")
    return values  # type: ignore[return-value]


def _per_layer(value, name: str, kind: type) -> Tuple:
    if isinstance(value, kind):
        return (value, value, value)
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, kind) for v in value):
        return tuple(value)
    raise TypeError(f"{name} must be a {kind.__name__} or a sequence of three (input, hidden, readout), got {value!r}")


def _init_linear(lin: nn.Linear, init: str) -> None:
    bound = 1.0 / math.sqrt(lin.in_features)
    if init == "uniform":
        lin.weight.uniform_(-bound, bound)
    elif init == "normal":
        lin.weight.normal_(0.0, bound)
    else:
        lin.weight.zero_()
    if lin.bias is not None:
        if init == "zero":
            lin.bias.zero_()
        else:
            lin.bias.uniform_(-bound, bound)


def _masks(masks: MaskArg, name: str, linears, allow_vector: bool):
    if masks is None:
        return (None, None, None)
    if isinstance(masks, Tensor) or not isinstance(masks, (list, tuple)) or len(masks) != 3:
        raise TypeError(f"{name} must be None or a sequence of three (input, hidden, readout) masks or None")
    out = []
    for layer, lin, mask in zip(LAYERS, linears, masks):
        if mask is None:
            out.append(None)
            continue
        mask = torch.as_tensor(mask)
        if mask.dtype == torch.bool:
            mask = mask.to(torch.float32)
        shape = tuple(lin.weight.shape)
        if allow_vector and mask.dim() == 1 and mask.numel() == lin.in_features:
            mask = mask.reshape(1, -1).expand(shape)
        if tuple(mask.shape) != shape:
            expected = f"{list(shape)}" + (f" or [{lin.in_features}]" if allow_vector else "")
            raise ValueError(f"{name} for the {layer} layer must have shape {expected}, got {list(mask.shape)}")
        if not bool(torch.isfinite(mask.to(torch.float64)).all()):
            raise ValueError(f"{name} for the {layer} layer must be finite")
        out.append(mask.to(lin.weight.dtype).contiguous())
    return tuple(out)
