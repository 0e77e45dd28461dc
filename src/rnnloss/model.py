"""The continuous-time RNN that :class:`rnnloss.RNNLoss` reads.

Dynamics (Euler step of τ dv/dt = −v + W_hid r + b_hid + W_in u + b_in, α = dt / τ)::

    v_{t+1} = (1 − α) v_t + α (W_hid r_t + b_hid + W_in u_t + b_in + σ_pre ξ_t)
    r_{t+1} = f(v_{t+1}) + σ_post η_t
    output_t = W_out r_t + b_out

with v_0 = ``init_state`` (or 0) and r_0 = f(v_0). ξ, η are standard normal noise, drawn only in training mode.
``states`` holds r_1 … r_T (the rates after each step) and ``output`` the readout of each of them.

Parameter names follow nn4n's, so its state dicts load: ``recurrent_layer.input_layer.weight`` (N_hid × N_in),
``recurrent_layer.hidden_layer.weight`` (N_hid × N_hid), ``readout_layer.weight`` (N_out × N_hid), ``.bias``.
"""
import math
import operator
from typing import Final, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rules import Rule, check_float_tensor, dtype_name, error, shape_of

ACTIVATIONS = ("relu", "tanh", "sigmoid", "softplus", "retanh")
INITS = ("uniform", "normal", "zero")  # of weights and biases alike
INIT_STATES = ("zero", "learn")
LAYERS = ("input", "hidden", "readout")
MASK_KINDS = ("sparsity", "sign", "plasticity")  # buffers sparsity_input, sign_input, ...

MaskArg = Optional[Sequence[Optional[Tensor]]]
InitArg = Union[str, Tensor]
BiasArg = Union[bool, None, str, Tensor]


def _project(weight: Tensor, sparsity: Optional[Tensor], sign: Optional[Tensor]) -> None:
    """Project ``weight`` in place (under ``no_grad``) onto its masks; ``None``: the layer has no such mask."""
    if sparsity is not None:
        weight.mul_(sparsity)
    if sign is not None:
        w = torch.where(sign > 0, weight.clamp(min=0.0), weight)
        w = torch.where(sign < 0, w.clamp(max=0.0), w)
        weight.copy_(w)


def _scale_grad(weight: Tensor, scale: Optional[Tensor]) -> None:
    """Multiply ``weight.grad`` in place by the per-synapse plasticity ``scale`` (if any)."""
    grad = weight.grad
    if scale is not None and grad is not None:
        grad.mul_(scale)


class RecurrentLayer(nn.Module):
    """nn4n's ``recurrent_layer``: ``hidden_state`` is v_0 (trained only with ``init_state="learn"``), ``alpha``
    the per-neuron α with ``learn_alpha=True``, else ``None`` (the fixed scalar is used)."""

    def __init__(self, n_in: int, n_hid: int, bias_in: bool, bias_hid: bool, learn_init: bool,
                 alpha: Optional[float]) -> None:
        super().__init__()
        self.input_layer = nn.Linear(n_in, n_hid, bias=bias_in)
        self.hidden_layer = nn.Linear(n_hid, n_hid, bias=bias_hid)
        self.hidden_state = nn.Parameter(torch.zeros(n_hid), requires_grad=learn_init)
        self.alpha = None if alpha is None else nn.Parameter(torch.full((n_hid,), alpha))


class CTRNN(nn.Module):
    r"""Continuous-time recurrent network (see the module docstring for the dynamics).

    Args:
        dims: ``(N_in, N_hid, N_out)``, positive integers.
        tau: time constant (the unit of dt); α = dt / τ must lie in (0, 1].
        dt: the Euler step.
        activation: one of ``relu``, ``tanh``, ``sigmoid``, ``softplus``, ``retanh`` (max(tanh(x), 0)).
        preact_noise: σ_pre, ≥ 0; used in training mode only.
        postact_noise: σ_post, ≥ 0; used in training mode only.
        biases: for all three layers or as a sequence (input, hidden, readout), each one of ``True``
            (= ``"uniform"``), ``"uniform"``, ``"normal"``, ``"zero"`` (learnable, from 0), ``None`` (a zero
            bias that is not trained: nn4n's default), ``False`` (no bias parameter at all) or a tensor
            (N_out_layer,) holding the initial bias.
        weights: initialisation for all layers or as a sequence of three: ``"uniform"`` (U(±1/√fan_in)),
            ``"normal"`` (N(0, 1/fan_in)), ``"zero"``, or a tensor shaped like the weight (out × in).
        sparsity_masks: ``None`` or a sequence (input, hidden, readout) of ``None`` or tensors shaped like the
            weight (out × in); 0 marks an absent synapse.
        ei_masks: the same, of signs: +1 excitatory, −1 inhibitory, 0 unconstrained, also 1-D of length
            ``in_features`` (one sign per presynaptic neuron — Dale's law); at initialisation the constrained
            weights take their sign (|w|·sign) and, where a layer has both signs, the larger of the summed
            excitatory and inhibitory weight is scaled down to match the other (E/I balance).
        plasticity_masks: the same, ≥ 0: per-synapse learning-rate scales applied to the gradients by
            :meth:`apply_plasticity` (0 freezes a synapse).
        init_state: ``"zero"`` (v_0 = 0) or ``"learn"`` (v_0 = ``recurrent_layer.hidden_state``, trained).
            An ``init_state`` argument to ``forward`` overrides both.
        learn_alpha: train one α per neuron (``recurrent_layer.alpha``, initialised to dt/τ and kept in
            [1e-3, 1] by :meth:`enforce_constraints`).
        batch_first: inputs and outputs are (B, T, ·) instead of the default (T, B, ·).

    Shape:
        - x: (T, B, N_in), or (B, T, N_in) with ``batch_first``; init_state: (B, N_hid).
        - output: (T, B, N_out); states: (T, B, N_hid) (batch first likewise).

    Masks are applied by :meth:`enforce_constraints` (at construction; a training loop calls it after each optimizer
    step); :meth:`apply_plasticity` goes between ``backward()`` and ``step()``. ``forward`` never changes parameters.

    Example::

        >>> model = CTRNN((3, 16, 2), tau=100.0, dt=10.0, activation="tanh")
        >>> model
        CTRNN(dims=(3, 16, 2), tau=100.0, dt=10.0, activation='tanh', layout=(T, B, N))
        >>> output, states = model(torch.randn(20, 4, 3))  # 20 steps, batch 4
        >>> tuple(output.shape), tuple(states.shape)
        ((20, 4, 2), (20, 4, 16))
    """

    alpha: Final[float]
    activation: Final[str]
    preact_noise: Final[float]
    postact_noise: Final[float]
    batch_first: Final[bool]
    learn_init: Final[bool]
    n_in: Final[int]
    n_hid: Final[int]
    n_out: Final[int]

    def __init__(self, dims: Sequence[int] = (1, 100, 1), *, tau: float = 100.0, dt: float = 10.0,
                 activation: str = "relu", preact_noise: float = 0.0, postact_noise: float = 0.0,
                 biases: Union[BiasArg, Sequence[BiasArg]] = True,
                 weights: Union[InitArg, Sequence[InitArg]] = "uniform", sparsity_masks: MaskArg = None,
                 ei_masks: MaskArg = None, plasticity_masks: MaskArg = None, init_state: str = "zero",
                 learn_alpha: bool = False, batch_first: bool = False) -> None:
        super().__init__()
        # The refusals come in this order; the C++ constructor checks in the same one.
        n_in, n_hid, n_out = _check_dims(dims)
        for name, value, rule in (("tau", tau, Rule.POSITIVE), ("dt", dt, Rule.POSITIVE),
                                  ("preact_noise", preact_noise, Rule.NON_NEGATIVE),
                                  ("postact_noise", postact_noise, Rule.NON_NEGATIVE)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                    value < 0 or (value == 0 and rule is Rule.POSITIVE):
                raise error(rule, name, repr(value))
        if dt > tau:
            raise error(Rule.DT_ABOVE_TAU, repr(dt), repr(tau))
        for name, value, choices in (("activation", activation, ACTIVATIONS), ("init_state", init_state, INIT_STATES)):
            if value not in choices:
                raise error(Rule.CHOICE, name, list(choices), repr(value))
        for name, value in (("batch_first", batch_first), ("learn_alpha", learn_alpha)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        bias_specs, weight_specs = _layer_specs(biases, weights, ((n_hid, n_in), (n_hid, n_hid), (n_out, n_hid)))
        self.n_in, self.n_hid, self.n_out = n_in, n_hid, n_out
        self.tau, self.dt, self.alpha = float(tau), float(dt), float(dt) / float(tau)
        self.activation, self.preact_noise, self.postact_noise = activation, float(preact_noise), float(postact_noise)
        self.batch_first, self.learn_init, self.init_state = batch_first, init_state == "learn", init_state
        self.learn_alpha = learn_alpha
        has_bias = [spec is not False for spec in bias_specs]
        self.recurrent_layer = RecurrentLayer(n_in, n_hid, has_bias[0], has_bias[1], self.learn_init,
                                              self.alpha if learn_alpha else None)
        self.readout_layer = nn.Linear(n_hid, n_out, bias=has_bias[2])
        linears = (self.recurrent_layer.input_layer, self.recurrent_layer.hidden_layer, self.readout_layer)
        with torch.no_grad():
            for lin, w_spec, b_spec in zip(linears, weight_specs, bias_specs):
                _init_linear(lin, w_spec, b_spec)
        sparsity = _masks(sparsity_masks, "sparsity_masks", linears, allow_vector=False)
        signs = _masks(ei_masks, "ei_masks", linears, allow_vector=True)
        plasticity = _masks(plasticity_masks, "plasticity_masks", linears, allow_vector=False)
        for layer, sign, scale in zip(LAYERS, signs, plasticity):
            if sign is not None and not bool(torch.all((sign == 1) | (sign == -1) | (sign == 0))):
                raise error(Rule.EI_VALUES, layer)
            if scale is not None and not bool(torch.all(scale >= 0)):
                raise error(Rule.PLASTICITY_VALUES, layer)
        # A given mask travels in state_dict; an absent one is a None buffer: no memory, no state_dict key (so plain
        # models keep nn4n's keys exactly), skipped by _project and _scale_grad, in TorchScript too.
        for layer, *layer_masks in zip(LAYERS, sparsity, signs, plasticity):
            for kind, mask in zip(MASK_KINDS, layer_masks):
                self.register_buffer(f"{kind}_{layer}", None if mask is None else mask.clone())
        with torch.no_grad():
            for lin, sign, w_spec in zip(linears, signs, weight_specs):
                if sign is not None and isinstance(w_spec, str):
                    _dale_init(lin.weight, sign)
        self.enforce_constraints()

    def __repr__(self) -> str:  # one line: the options, not three Linear layers
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        parts = [f"dims={(self.n_in, self.n_hid, self.n_out)}", f"tau={self.tau!r}", f"dt={self.dt!r}",
                 f"activation={self.activation!r}", f"layout={'(B, T, N)' if self.batch_first else '(T, B, N)'}"]
        parts += [f"{name}={value!r}" for name, value in (
            ("preact_noise", self.preact_noise), ("postact_noise", self.postact_noise),
            ("init_state", self.learn_init and "learn"), ("learn_alpha", self.learn_alpha)) if value]
        masks = [kind for kind in MASK_KINDS if any(getattr(self, f"{kind}_{layer}") is not None for layer in LAYERS)]
        if masks:
            parts.append("masks=" + "+".join(masks))
        return ", ".join(parts)

    @classmethod
    def from_nn4n(cls, path_or_checkpoint, *, trust_checkpoint: bool = False, **overrides) -> "CTRNN":
        """Build a CTRNN from an nn4n (1.1) checkpoint (a path or the dict nn4n's ``save()`` writes) as
        :func:`rnnloss.nn4n.read_checkpoint` translates it; ``overrides`` (e.g. ``batch_first=True``) replace
        constructor arguments. Numpy arrays in it need ``trust_checkpoint=True``: full unpickling, for trusted files."""
        from .nn4n import NN4NCheckpointError, read_checkpoint
        dims, options, state = read_checkpoint(path_or_checkpoint, trust_checkpoint=trust_checkpoint,
                                               init_state=overrides.get("init_state"))
        options.update(overrides)
        model = cls(dims, **options)
        # Not strict: the checkpoint holds the parameters; given masks come from the options.
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys:  # an override dropped a parameter the checkpoint has (biases=False)
            raise NN4NCheckpointError(f"the checkpoint has {sorted(result.unexpected_keys)}, which the model built "
                                      f"with overrides {sorted(overrides)} lacks")
        return model

    @torch.jit.export
    def enforce_constraints(self) -> None:
        """Project the weights in place: zero absent synapses, clamp signs to the E/I masks, keep a learnable α
        in [1e-3, 1]."""
        with torch.no_grad():
            _project(self.recurrent_layer.input_layer.weight, self.sparsity_input, self.sign_input)
            _project(self.recurrent_layer.hidden_layer.weight, self.sparsity_hidden, self.sign_hidden)
            _project(self.readout_layer.weight, self.sparsity_readout, self.sign_readout)
            alpha = self.recurrent_layer.alpha
            if alpha is not None:  # (a literal: TorchScript cannot read a module-level float)
                alpha.clamp_(min=1e-3, max=1.0)

    @torch.jit.export
    def apply_plasticity(self) -> None:
        """Scale each weight's gradient by its plasticity mask (call between backward and step)."""
        with torch.no_grad():
            _scale_grad(self.recurrent_layer.input_layer.weight, self.plasticity_input)
            _scale_grad(self.recurrent_layer.hidden_layer.weight, self.plasticity_hidden)
            _scale_grad(self.readout_layer.weight, self.plasticity_readout)

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
        if x.dim() != 3 or x.size(2) != self.n_in:
            layout = "(B, T, N_in)" if self.batch_first else "(T, B, N_in)"
            raise ValueError(Rule.X_SHAPE.value.format(layout, self.n_in, shape_of(x)))
        if x.dtype != w_in.dtype:
            raise TypeError(Rule.X_DTYPE.value.format(dtype_name(w_in), dtype_name(x)))
        if self.batch_first:
            x = x.transpose(0, 1)
        steps, batch = x.size(0), x.size(1)
        if init_state is not None:
            check_float_tensor(init_state, "init_state")
            if init_state.dim() != 2 or init_state.size(0) != batch or init_state.size(1) != self.n_hid:
                raise ValueError(Rule.INIT_STATE_SHAPE.value.format([batch, self.n_hid], shape_of(init_state)))
            v = init_state.to(x.dtype)
        elif self.learn_init:
            v = self.recurrent_layer.hidden_state.to(x.dtype).expand(batch, self.n_hid)
        else:
            v = torch.zeros(batch, self.n_hid, dtype=x.dtype, device=x.device)
        # The input drive and both biases for every step in one matmul.
        drive = F.linear(x, w_in, self.recurrent_layer.input_layer.bias)
        b_hid = self.recurrent_layer.hidden_layer.bias
        if b_hid is not None:
            drive = drive + b_hid
        w_hid_t = self.recurrent_layer.hidden_layer.weight.t()
        noisy_pre = self.training and self.preact_noise > 0.0
        noisy_post = self.training and self.postact_noise > 0.0
        alpha_vec = self.recurrent_layer.alpha
        r = self._activate(v)
        rates = []
        # unbind, not drive[t]: the backward of each select would zero-fill a full (T, B, N_hid) tensor per step
        # (O(T²) memory traffic, most of a training step); unbind's backward stacks the step gradients once.
        drive_steps = drive.unbind(0)
        for t in range(steps):
            pre = torch.addmm(drive_steps[t], r, w_hid_t)
            if noisy_pre:
                pre = pre + self.preact_noise * torch.randn_like(pre)
            if alpha_vec is not None:
                v = (1.0 - alpha_vec) * v + alpha_vec * pre
            else:
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
        raise TypeError(Rule.DIMS.value.format(repr(dims))) from None
    # ints and numpy ints; not floats or bools
    if len(values) != 3 or any(isinstance(d, bool) or not hasattr(d, "__index__") or operator.index(d) <= 0
                               for d in values):
        raise error(Rule.DIMS, repr(dims))
    return operator.index(values[0]), operator.index(values[1]), operator.index(values[2])


def _layer_specs(biases, weights, shapes) -> Tuple[Tuple, Tuple]:
    """The (input, hidden, readout) specs of ``biases`` and ``weights``, checked; both are spread to three before
    any spec is checked (the C++ constructor refuses in the same order)."""
    specs = []
    for name, value in (("biases", biases), ("weights", weights)):
        if isinstance(value, Tensor):
            raise TypeError(f"{name} as a tensor must be given per layer: a sequence of three (input, hidden, readout)")
        if isinstance(value, (list, tuple)) and len(value) != 3:
            raise error(Rule.PER_LAYER, name, repr(value))
        specs.append(tuple(value) if isinstance(value, (list, tuple)) else (value, value, value))
    for name, layer_specs in zip(("biases", "weights"), specs):
        also = "True, False, None, " if name == "biases" else ""
        for layer, spec, shape in zip(LAYERS, layer_specs, shapes):
            shape = shape[:1] if name == "biases" else shape  # a bias is (out,), a weight (out × in)
            if isinstance(spec, Tensor):
                if tuple(spec.shape) != shape:
                    raise error(Rule.LAYER_SHAPE, name, layer, list(shape), list(spec.shape))
                if not bool(torch.isfinite(spec).all()):
                    raise error(Rule.LAYER_FINITE, name, layer)
            elif isinstance(spec, str):
                if spec not in INITS:
                    raise error(Rule.LAYER_CHOICE, name, layer, f"{also}{list(INITS)} or a tensor", repr(spec))
            elif name == "weights" or not (spec is None or isinstance(spec, bool)):
                raise TypeError(f"{name} for the {layer} layer must be {also}a string or a tensor, got {spec!r}")
    return specs[0], specs[1]


def _init_linear(lin: nn.Linear, weight, bias) -> None:
    """Initialise ``lin`` from its (checked) specs; a ``None`` bias is nn4n's fixed zero bias."""
    bound = 1.0 / math.sqrt(lin.in_features)
    for param, spec in ((lin.weight, weight), (lin.bias, bias)):
        if param is None:
            continue
        if isinstance(spec, Tensor):
            param.copy_(spec)
        elif spec is True or spec == "uniform":
            param.uniform_(-bound, bound)
        elif spec == "normal":
            param.normal_(0.0, bound)
        else:  # "zero", or a None bias
            param.zero_()
    if lin.bias is not None and bias is None:
        lin.bias.requires_grad_(False)


def _dale_init(weight: Tensor, sign: Tensor) -> None:
    """|w|·sign on constrained entries, then balance the summed E and I weight (in place)."""
    weight.copy_(torch.where(sign != 0, weight.abs() * sign, weight))
    exc, inh = weight[sign > 0].sum(), -weight[sign < 0].sum()
    if exc > 0 and inh > 0:  # the larger side is scaled down to the other
        side, ratio = (sign > 0, inh / exc) if exc > inh else (sign < 0, exc / inh)
        weight.copy_(torch.where(side, weight * ratio, weight))


def _masks(masks: MaskArg, name: str, linears, allow_vector: bool):
    """The three masks of ``name`` checked against the weights' shapes, in the weights' dtype (or ``None``)."""
    if masks is None:
        return (None, None, None)
    if not isinstance(masks, (list, tuple)) or len(masks) != 3:
        raise TypeError(f"{name} must be None or a sequence of three (input, hidden, readout) masks or None")
    out = []
    for layer, lin, mask in zip(LAYERS, linears, masks):
        if mask is not None:
            mask = torch.as_tensor(mask)
            shape = tuple(lin.weight.shape)
            if allow_vector and mask.dim() == 1 and mask.numel() == lin.in_features:
                mask = mask.reshape(1, -1).expand(shape)
            if tuple(mask.shape) != shape:
                expected = f"{list(shape)}" + (f" or [{lin.in_features}]" if allow_vector else "")
                raise error(Rule.LAYER_SHAPE, name, layer, expected, list(mask.shape))
            if not bool(torch.isfinite(mask.to(torch.float64)).all()):
                raise error(Rule.LAYER_FINITE, name, layer)
            mask = mask.to(lin.weight.dtype).contiguous()
        out.append(mask)
    return tuple(out)
