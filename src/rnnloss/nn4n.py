"""Reading nn4n (1.1) checkpoints: the translation behind ``CTRNN.from_nn4n``.

:func:`read_checkpoint` turns what nn4n's ``CTRNN.save(path)`` writes
(``{"model_state_dict": ..., "kwargs": ...}``, ``kwargs`` being the constructor arguments exactly as
the user passed them) into the arguments of :class:`rnnloss.CTRNN` and the state dict to load.
This module sits below the model: it never imports it; :meth:`rnnloss.CTRNN.from_nn4n` calls it.
What changes on the way in:

- masks: nn4n takes them as (in, out) and transposes; here they are (out, in) like the weights.
  nn4n turns an E/I mask into ±1 with ``> 0`` → +1 and everything else → −1, and a sparsity
  mask into 0/1 with ``!= 0``; the same mapping is applied here.
- plasticity masks: nn4n rescales all three together to [0, 1] ((m − min) / (max − min) over
  every given mask; all ones when they are all equal); the same rescaled masks are used here.
- biases: nn4n's ``None`` (its default) is a zero bias that is not trained: kept as such.
- ``init_state``: ``"zero"`` and ``"learn"`` map directly; nn4n's ``"keep"`` (carry the state
  between calls) has no stateless equivalent and is refused with a message saying so.
- The weights come from the state dict as saved. nn4n enforces its masks at the start of every
  training-mode forward, so a checkpoint saved right after an optimizer step can break them
  slightly; the loaded model reproduces nn4n's eval outputs exactly as saved, and
  :meth:`CTRNN.enforce_constraints` projects it when training resumes.
"""
import os
import pickle
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

NN4N_ACTIVATIONS = ("relu", "tanh", "sigmoid", "retanh")
NN4N_KEYS = {
    "recurrent_layer.hidden_state", "recurrent_layer.input_layer.weight", "recurrent_layer.input_layer.bias",
    "recurrent_layer.hidden_layer.weight", "recurrent_layer.hidden_layer.bias", "readout_layer.weight",
    "readout_layer.bias",
}


class NN4NCheckpointError(ValueError):
    """The input is not an nn4n CTRNN checkpoint this package can read."""


def load_checkpoint(path_or_checkpoint, trust_checkpoint: bool = False) -> Dict[str, Any]:
    """The checkpoint dict: loaded with ``weights_only=True`` unless the caller trusts the file."""
    if isinstance(path_or_checkpoint, dict):
        return path_or_checkpoint
    if not isinstance(path_or_checkpoint, (str, os.PathLike)):
        raise TypeError(f"path_or_checkpoint must be a path or the dict nn4n's save() writes, "
                        f"got {type(path_or_checkpoint).__name__}")
    path = os.fspath(path_or_checkpoint)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_checkpoint:
            reason = str(e).strip().splitlines()[-1][:300]
            raise NN4NCheckpointError(
                f"{path}: torch.load(weights_only=True) refused this checkpoint ({reason}). nn4n checkpoints "
                "whose kwargs hold numpy arrays (e.g. masks) need CTRNN.from_nn4n(path, trust_checkpoint=True); "
                "use it only for files you trust, since full unpickling can run arbitrary code") from None
    # stacklevel 4: the user's call of CTRNN.from_nn4n (via read_checkpoint and CTRNN.from_nn4n)
    warnings.warn(f"loading {path} with full unpickling (trust_checkpoint=True)", stacklevel=4)
    return torch.load(path, map_location="cpu", weights_only=False)


def _as_tensor(value, name: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    try:
        import numpy as np
        if isinstance(value, np.ndarray):
            return torch.from_numpy(value)
    except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
        pass
    raise NN4NCheckpointError(f"kwargs[{name!r}] must hold tensors or numpy arrays, got {type(value).__name__}")


def _three(value, name: str) -> List[Optional[Any]]:
    if value is None:
        return [None, None, None]
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise NN4NCheckpointError(f"kwargs[{name!r}] must be None or a list of three, got {value!r}")
    return list(value)


def _masks(kwargs: Dict[str, Any], name: str, convert) -> Optional[List[Optional[Tensor]]]:
    masks = _three(kwargs.get(name), name)
    if all(m is None for m in masks):
        return None
    return [None if m is None else convert(_as_tensor(m, name).T.float()) for m in masks]


def _plasticity(kwargs: Dict[str, Any], shapes) -> Optional[List[Optional[Tensor]]]:
    masks = _three(kwargs.get("plasticity_masks"), "plasticity_masks")
    given = [None if m is None else _as_tensor(m, "plasticity_masks").T.float() for m in masks]
    if all(m is None for m in given):
        return None
    low = min(float(m.min()) for m in given if m is not None)
    high = max(float(m.max()) for m in given if m is not None)
    if low == high:  # nn4n: every synapse learns at the full rate
        return None
    return [torch.ones(shape) if m is None else (m - low) / (high - low) for m, shape in zip(given, shapes)]


def _dims(kwargs: Dict[str, Any]) -> List[int]:
    dims = kwargs.get("dims")
    if dims is None and any(k in kwargs for k in ("input_dim", "hidden_size", "output_dim")):
        dims = [kwargs.get("input_dim", 1), kwargs.get("hidden_size", 100), kwargs.get("output_dim", 1)]
    if dims is None:
        dims = [1, 100, 1]  # nn4n's default
    return [int(d) for d in dims]


def _biases(kwargs: Dict[str, Any]):
    value = kwargs.get("biases")
    specs = _three(value, "biases") if isinstance(value, (list, tuple)) or value is None else [value] * 3
    out = []
    for spec in specs:
        if spec is None or isinstance(spec, str):
            out.append(spec)
        elif isinstance(spec, (int, float)) and not isinstance(spec, bool) and spec == 0:
            out.append("zero")
        else:
            out.append(_as_tensor(spec, "biases").float().reshape(-1))
    return out


def read_checkpoint(path_or_checkpoint, *, trust_checkpoint: bool = False
                    ) -> Tuple[List[int], Dict[str, Any], Dict[str, Tensor]]:
    """``(dims, options, state)`` of the nn4n CTRNN in a checkpoint (a path or the dict nn4n saves).

    ``CTRNN(dims, **options)`` builds the equivalent model (see the module docstring for what is
    translated); ``state`` holds the checkpoint's nn4n parameters for ``load_state_dict``.
    Raises :class:`NN4NCheckpointError` for anything that is not an nn4n CTRNN checkpoint this
    package can read.
    """
    ckpt = load_checkpoint(path_or_checkpoint, trust_checkpoint)
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt or "kwargs" not in ckpt:
        raise NN4NCheckpointError("not an nn4n checkpoint: expected a dict with 'model_state_dict' and 'kwargs' "
                                  "(what nn4n's CTRNN.save() writes)")
    kwargs = dict(ckpt["kwargs"])
    state = dict(ckpt["model_state_dict"])
    missing = NN4N_KEYS - set(state)
    if missing:
        raise NN4NCheckpointError(f"the state dict lacks nn4n CTRNN keys {sorted(missing)}")
    unexpected = set(state) - NN4N_KEYS
    if unexpected:
        raise NN4NCheckpointError(f"unexpected state-dict keys {sorted(unexpected)}")
    activation = kwargs.get("activation", "relu")
    if activation not in NN4N_ACTIVATIONS:
        raise NN4NCheckpointError(f"kwargs['activation'] must be one of {list(NN4N_ACTIVATIONS)}, got {activation!r}")
    init_state = kwargs.get("init_state", "zero")
    if init_state == "keep":
        raise NN4NCheckpointError("kwargs['init_state'] is 'keep' (nn4n carries the state between calls); rnnloss's "
                                  "forward is stateless: load with init_state='zero' via overrides and pass "
                                  "init_state= to forward to continue from a saved state")
    dims = _dims(kwargs)
    shapes = ((dims[1], dims[0]), (dims[1], dims[1]), (dims[2], dims[1]))
    options = dict(
        tau=float(kwargs.get("tau", 100)), dt=float(kwargs.get("dt", 10)), activation=activation,
        preact_noise=float(kwargs.get("preact_noise", 0)), postact_noise=float(kwargs.get("postact_noise", 0)),
        biases=_biases(kwargs), weights="zero",
        sparsity_masks=_masks(kwargs, "sparsity_masks", lambda m: (m != 0).float()),
        ei_masks=_masks(kwargs, "ei_masks", lambda m: torch.where(m > 0, 1.0, -1.0)),
        plasticity_masks=_plasticity(kwargs, shapes), init_state=init_state,
    )
    return dims, options, state
