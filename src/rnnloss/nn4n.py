"""Reading nn4n (1.1) checkpoints for ``CTRNN.from_nn4n`` (this module never imports the model).

:func:`read_checkpoint` turns what nn4n's ``CTRNN.save(path)`` writes (``{"model_state_dict": ..., "kwargs": ...}``,
the kwargs as the user passed them) into :class:`rnnloss.CTRNN`'s arguments and the state dict to load:

- masks are (out, in) like the weights (nn4n takes (in, out)), mapped as nn4n does: E/I ``> 0`` → +1, anything
  else → −1; sparsity ``!= 0`` → 1; plasticity rescaled all together to [0, 1] ((m − min) / (max − min) over
  every given mask; all ones when they are all equal).
- biases: nn4n's ``None`` (its default) is a zero bias that is not trained: kept as such.
- ``init_state``: nn4n's ``"keep"`` (carry the state between calls) has no stateless equivalent: refused, saying so.
- weights are as saved: nn4n enforces its masks at the start of every training-mode forward, so a checkpoint saved
  after an optimizer step can break them slightly; the loaded model reproduces nn4n's eval outputs exactly, and
  :meth:`CTRNN.enforce_constraints` projects it when training resumes.
- dims: the declared ones must be the saved tensors' (a file must not make the model allocate more than it holds).
"""
import os
import pickle
import sys
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

NN4N_ACTIVATIONS = ("relu", "tanh", "sigmoid", "retanh")
NN4N_SHAPES = {  # nn4n's state dict: each key's shape as indices into dims (N_in, N_hid, N_out)
    "recurrent_layer.hidden_state": (1,), "recurrent_layer.input_layer.weight": (1, 0),
    "recurrent_layer.input_layer.bias": (1,), "recurrent_layer.hidden_layer.weight": (1, 1),
    "recurrent_layer.hidden_layer.bias": (1,), "readout_layer.weight": (2, 1), "readout_layer.bias": (2,)}


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
    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO or device would block torch.load forever
        raise NN4NCheckpointError(f"{path} is not a regular file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_checkpoint:
            reason = str(e).strip().splitlines()[-1][:300]
            raise NN4NCheckpointError(f"{path}: torch.load(weights_only=True) refused this checkpoint ({reason}). "
                                      "nn4n checkpoints whose kwargs hold numpy arrays (e.g. masks) need "
                                      "CTRNN.from_nn4n(path, trust_checkpoint=True); use it only for files you trust, "
                                      "since full unpickling can run arbitrary code") from None
    except FileNotFoundError:
        raise
    except Exception as e:  # not a torch.save file at all (torch's texts run to paragraphs)
        raise NN4NCheckpointError(f"{path} is not a checkpoint torch.load can read "
                                  f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    # stacklevel 4: the user's call of CTRNN.from_nn4n (via read_checkpoint and CTRNN.from_nn4n)
    warnings.warn(f"loading {path} with full unpickling (trust_checkpoint=True)", stacklevel=4)
    return torch.load(path, map_location="cpu", weights_only=False)


def _as_tensor(value, name: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    np = sys.modules.get("numpy")  # a numpy array can only be here if numpy is loaded: no import needed
    if np is not None and isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise NN4NCheckpointError(f"kwargs[{name!r}] must hold tensors or numpy arrays, got {type(value).__name__}")


def _three(value, name: str) -> List[Optional[Any]]:
    if value is not None and (not isinstance(value, (list, tuple)) or len(value) != 3):
        raise NN4NCheckpointError(f"kwargs[{name!r}] must be None or a list of three, got {value!r}")
    return [None, None, None] if value is None else list(value)


def _masks(kwargs: Dict[str, Any], shapes) -> Dict[str, Optional[List[Optional[Tensor]]]]:
    """The three mask options (``None`` where nn4n's kwargs give no mask), translated as the module docstring says."""
    out = {}
    for name, convert in (("sparsity_masks", lambda m: (m != 0).float()),
                          ("ei_masks", lambda m: torch.where(m > 0, 1.0, -1.0)), ("plasticity_masks", lambda m: m)):
        masks = [None if m is None else convert(_as_tensor(m, name).T.float()) for m in _three(kwargs.get(name), name)]
        out[name] = None if all(m is None for m in masks) else masks
    given = out["plasticity_masks"]
    if given is not None:  # nn4n's rescaling; all equal: every synapse learns at the full rate
        low = min(float(m.min()) for m in given if m is not None)
        high = max(float(m.max()) for m in given if m is not None)
        out["plasticity_masks"] = None if low == high else [
            torch.ones(shape) if m is None else (m - low) / (high - low) for m, shape in zip(given, shapes)]
    return out


def _biases(value) -> List[Any]:
    """nn4n's ``biases`` per layer as CTRNN's: ``None`` and strings as they are, 0 as ``"zero"``, else a tensor."""
    out = []
    for spec in _three(value, "biases") if isinstance(value, (list, tuple)) else [value] * 3:
        if isinstance(spec, (int, float)) and not isinstance(spec, bool) and spec == 0:
            spec = "zero"
        elif not (spec is None or isinstance(spec, str)):
            spec = _as_tensor(spec, "biases").float().reshape(-1)
        out.append(spec)
    return out


def _dims(kwargs: Dict[str, Any], state: Dict[str, Any]) -> List[int]:
    """The declared dims, refused (before anything is built) unless the state dict's tensors have them."""
    dims = kwargs.get("dims")
    if dims is None:  # nn4n's older names, and its defaults
        dims = [kwargs.get("input_dim", 1), kwargs.get("hidden_size", 100), kwargs.get("output_dim", 1)]
    dims = [int(d) for d in dims]
    shapes = {key: list(t.shape) if isinstance(t, Tensor) else type(t).__name__ for key, t in state.items()}
    if len(dims) != 3 or any(shapes[key] != [dims[i] for i in index] for key, index in NN4N_SHAPES.items()):
        raise NN4NCheckpointError(f"kwargs dims {dims} do not match the state dict's tensor shapes {shapes}")
    return dims


def read_checkpoint(path_or_checkpoint, *, trust_checkpoint: bool = False,
                    init_state: Optional[str] = None) -> Tuple[List[int], Dict, Dict[str, Tensor]]:
    """``(dims, options, state)``: ``CTRNN(dims, **options)`` builds the nn4n CTRNN of a checkpoint (a path or the dict
    nn4n saves) and loads ``state``; ``init_state`` replaces the checkpoint's (its "keep" has no stateless
    equivalent). Raises :class:`NN4NCheckpointError` for anything else."""
    ckpt = load_checkpoint(path_or_checkpoint, trust_checkpoint)
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt or "kwargs" not in ckpt:
        raise NN4NCheckpointError("not an nn4n checkpoint: expected a dict with 'model_state_dict' and 'kwargs' "
                                  "(what nn4n's CTRNN.save() writes)")
    kwargs, state = dict(ckpt["kwargs"]), dict(ckpt["model_state_dict"])
    for problem, keys in (("the state dict lacks nn4n CTRNN keys", set(NN4N_SHAPES) - set(state)),
                          ("unexpected state-dict keys", set(state) - set(NN4N_SHAPES))):
        if keys:
            raise NN4NCheckpointError(f"{problem} {sorted(keys)}")
    activation = kwargs.get("activation", "relu")
    if activation not in NN4N_ACTIVATIONS:
        raise NN4NCheckpointError(f"kwargs['activation'] must be one of {list(NN4N_ACTIVATIONS)}, got {activation!r}")
    init_state = init_state or kwargs.get("init_state", "zero")
    if init_state == "keep":
        raise NN4NCheckpointError("kwargs['init_state'] is 'keep' (nn4n carries the state between calls); rnnloss's "
                                  "forward is stateless: CTRNN.from_nn4n(path, init_state='zero') loads it; pass "
                                  "init_state= to forward to continue from a saved state")
    dims = _dims(kwargs, state)
    options = dict(
        tau=float(kwargs.get("tau", 100)), dt=float(kwargs.get("dt", 10)), activation=activation,
        preact_noise=float(kwargs.get("preact_noise", 0)), postact_noise=float(kwargs.get("postact_noise", 0)),
        biases=_biases(kwargs.get("biases")), weights="zero",
        **_masks(kwargs, ((dims[1], dims[0]), (dims[1], dims[1]), (dims[2], dims[1]))), init_state=init_state,
    )
    return dims, options, state
