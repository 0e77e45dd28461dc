"""The export artifact that the native C++ library reads: ``rnnloss_native.pt``.

``rnnloss::load(dir)`` (C++, no TorchScript) rebuilds a :class:`~rnnloss.CTRNN` and its
:class:`~rnnloss.RNNLoss` from it; Python reads it with ``torch.load(path, weights_only=True)``.

Format (version 1): ``torch.save`` of a dict holding only plain values (str, int, float, bool and
lists of them) and tensors, so that both ``torch::pickle_load`` and the weights-only unpickler
accept it::

    {
      "format": "rnnloss.native",
      "version": 1,
      "model": {
        "dims": [N_in, N_hid, N_out],            # ints
        "tau": float, "dt": float,
        "activation": "relu" | "tanh" | "sigmoid" | "softplus" | "retanh",
        "preact_noise": float, "postact_noise": float,
        "batch_first": bool, "learn_alpha": bool,
        "init_state": "zero" | "learn",
        "biases": [kind] * 3,                    # input, hidden, readout: "trained" (a trained
                                                 # parameter), "fixed" (zero, never trained:
                                                 # nn4n's None) or "absent" (no bias)
        "sparsity_masks": [bool] * 3,            # which layers have a mask; the masks themselves
        "ei_masks": [bool] * 3,                  # are in state_dict (sparsity_input, sign_hidden,
        "plasticity_masks": [bool] * 3,          # plasticity_readout, ...), weight-shaped
      },
      "loss": {
        "component_names": ["mse", "in", "hid", "out", "fr", "fr_sd", "fr_cv"],
        "active": [bool] * 7,                    # fixed at construction (λ > 0 then)
        "lambdas": [float] * 7,                  # the current λ (the buffer; float64 values)
      },
      "state_dict": {name: tensor},              # model.state_dict(): parameters and given masks,
                                                 # in the model's dtype, on the CPU
    }

The model's dtype is that of its tensors. Noise settings are kept; the C++ model draws its own
noise in training mode. :func:`load_native` reads the file back into an eager loss (the export's
parity check and ``--verify`` do, so the file is checked like the graphs).
"""
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch

from .loss import COMPONENT_NAMES, LAMBDA_NAMES, RNNLoss
from .model import CTRNN, LAYERS as _LAYERS

NATIVE = "rnnloss_native.pt"
FORMAT = "rnnloss.native"
VERSION = 1


def _bias_kind(linear: torch.nn.Linear) -> str:
    if linear.bias is None:
        return "absent"
    return "trained" if linear.bias.requires_grad else "fixed"


def native_payload(loss: RNNLoss) -> Dict[str, Any]:
    """The dict :func:`save_native` writes (see the module docstring)."""
    model = loss.model
    state = {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}
    linears = (model.recurrent_layer.input_layer, model.recurrent_layer.hidden_layer, model.readout_layer)
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": {
            "dims": [model.n_in, model.n_hid, model.n_out],
            "tau": float(model.tau),
            "dt": float(model.dt),
            "activation": model.activation,
            "preact_noise": float(model.preact_noise),
            "postact_noise": float(model.postact_noise),
            "batch_first": bool(model.batch_first),
            "learn_alpha": bool(model.learn_alpha),
            "init_state": model.init_state,
            "biases": [_bias_kind(lin) for lin in linears],
            "sparsity_masks": [f"sparsity_{layer}" in state for layer in _LAYERS],
            "ei_masks": [f"sign_{layer}" in state for layer in _LAYERS],
            "plasticity_masks": [f"plasticity_{layer}" in state for layer in _LAYERS],
        },
        "loss": {
            "component_names": list(COMPONENT_NAMES),
            "active": [bool(on) for on in loss._on],
            "lambdas": [float(v) for v in loss.lambdas.detach().cpu().double()],
        },
        "state_dict": state,
    }


def save_native(loss: RNNLoss, path: Union[str, Path]) -> None:
    """Write ``loss`` and its model to ``path`` in the format of the module docstring."""
    if not isinstance(loss, RNNLoss):
        raise TypeError(f"loss must be an RNNLoss, got {type(loss).__name__}")
    if loss.sync_stats:
        raise ValueError("save_native: the native C++ loss has no sync_stats; build the loss with sync_stats=False")
    loss._check_lambdas(force=True)  # a file that load_native would refuse is not written
    torch.save(native_payload(loss), str(path))


_BIAS_SPEC = {"trained": True, "fixed": None, "absent": False}  # CTRNN's ``biases`` per kind


def rebuild(active: Sequence[bool], dtype: Optional[torch.dtype], dims: Sequence[int], **options: Any) -> RNNLoss:
    """A fresh eager loss for a recorded loss's state to be loaded into: ``CTRNN(dims, **options)``
    in ``dtype`` (None: CTRNN's own) inside an :class:`RNNLoss` whose ``active`` components (7 bools
    in :data:`COMPONENT_NAMES` order) have λ = 1 and the others λ = 0.

    λ = 1, not the recorded λ: a component annealed to 0 before saving stays active. Serves
    :func:`load_native` and :func:`rnnloss.scripted.from_torchscript`.
    """
    model = CTRNN(tuple(dims), **options)
    if dtype is not None:
        model = model.to(dtype)
    return RNNLoss(model, **{name: (1.0 if on else 0.0) for name, on in zip(LAMBDA_NAMES, active)})


def load_native(path: Union[str, Path]) -> RNNLoss:
    """An eager :class:`RNNLoss` (its model as ``.model``, in eval mode) from a file written by
    :func:`save_native`, read with ``torch.load(weights_only=True)``; the state loads strictly.

    Raises ValueError naming what is wrong when the file is not this format or its λ are invalid.
    """
    try:
        return _load_native(path)
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise ValueError(f"{path} is not a well-formed {FORMAT} file ({type(e).__name__}: {e})") from None


def _load_native(path: Union[str, Path]) -> RNNLoss:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an {FORMAT} file")
    if payload.get("version") != VERSION:
        raise ValueError(f"{path} has format version {payload.get('version')!r}; this package reads version {VERSION}")
    m, spec, state = payload["model"], payload["loss"], payload["state_dict"]
    if list(spec["component_names"]) != list(COMPONENT_NAMES):
        raise ValueError(f"{path} names the components {spec['component_names']}, not {list(COMPONENT_NAMES)}")
    masks = {kind: [state.get(f"{prefix}_{layer}") if m[kind][k] else None for k, layer in enumerate(_LAYERS)]
             for kind, prefix in (("sparsity_masks", "sparsity"), ("ei_masks", "sign"),
                                  ("plasticity_masks", "plasticity"))}
    loss = rebuild(spec["active"], next(iter(state.values())).dtype if state else None, m["dims"],
                   tau=m["tau"], dt=m["dt"], activation=m["activation"],
                   preact_noise=m["preact_noise"], postact_noise=m["postact_noise"],
                   biases=[_BIAS_SPEC[kind] for kind in m["biases"]], batch_first=m["batch_first"],
                   learn_alpha=m["learn_alpha"], init_state=m["init_state"], **masks)
    loss.model.load_state_dict(state, strict=True)
    with torch.no_grad():
        loss.lambdas.copy_(torch.tensor(spec["lambdas"], dtype=torch.float64))
    loss._check_lambdas(force=True)  # negative, NaN, or non-zero for an inactive component: ValueError now
    return loss.eval()
