"""Back from files to eager modules: the native weights file, and scripted modules.

``rnnloss_native.pt`` is what the native C++ library's ``rnnloss::load(dir)`` reads without
TorchScript, and Python with ``torch.load(weights_only=True)``: ``torch.save`` of a dict of plain
values (str, int, float, bool and lists of them) and tensors. Format (version 1)::

    {"format": "rnnloss.native", "version": 1,
     "model": {"dims": [N_in, N_hid, N_out], "tau": float, "dt": float, "activation": str,
               "preact_noise": float, "postact_noise": float, "batch_first": bool, "learn_alpha": bool,
               "init_state": "zero" | "learn",
               "biases": ["trained" | "fixed" | "absent"] * 3,      # input, hidden, readout
               "sparsity_masks": [bool] * 3, "ei_masks": [bool] * 3, "plasticity_masks": [bool] * 3},
     "loss": {"component_names": [...7 names], "active": [bool] * 7, "lambdas": [float] * 7},
     "state_dict": {name: tensor}}                                # the model's, on the CPU

"fixed" is nn4n's zero bias that is not trained; the masks themselves are in ``state_dict``
(``sparsity_input``, ``sign_hidden``, …). Every reader here checks the declared sizes against the
stored tensors before it builds anything, so a file that claims N_hid = 200000 fails in one line
instead of allocating 160 GB.
"""
import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from ..loss import RNNLoss
from ..model import CTRNN, LAYERS
from ..rules import COMPONENT_NAMES, LAMBDA_NAMES
from .folder import is_plain_file

NATIVE = "rnnloss_native.pt"
CODE_LIMIT = 16 << 20  # bytes of code one archive entry may hold before load_scripted refuses it
FORMAT = "rnnloss.native"
VERSION = 1
_BIAS_SPEC = {"trained": True, "fixed": None, "absent": False}  # CTRNN's ``biases`` per kind
# The CTRNN options the file records, each with the plain type it is written as (an attribute set after
# construction, e.g. ``batch_first = 1`` or a numpy string, is written as the reader expects it).
_OPTIONS = {"tau": float, "dt": float, "activation": str, "preact_noise": float, "postact_noise": float,
            "batch_first": bool, "learn_alpha": bool, "init_state": str}
_MASKS = (("sparsity_masks", "sparsity"), ("ei_masks", "sign"), ("plasticity_masks", "plasticity"))


class NotAnRNNLossFile(ValueError):
    """A file or module this package did not write (or cannot read); ``str()`` is one line."""


def _linears(model: CTRNN):
    return (model.recurrent_layer.input_layer, model.recurrent_layer.hidden_layer, model.readout_layer)


def _bias_spec(linear) -> Union[bool, None]:
    """The constructor's bias spec that recreates ``linear``'s: False (none), None (fixed 0), True (trained)."""
    return False if linear.bias is None else (True if linear.bias.requires_grad else None)


def native_payload(loss: RNNLoss) -> Dict[str, Any]:
    """The dict :func:`save_native` writes (see the module docstring)."""
    model = loss.model
    state = {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}
    kinds = {True: "trained", None: "fixed", False: "absent"}
    return {
        "format": FORMAT, "version": VERSION,
        "model": {"dims": [model.n_in, model.n_hid, model.n_out],
                  **{k: kind(getattr(model, k)) for k, kind in _OPTIONS.items()},
                  "biases": [kinds[_bias_spec(lin)] for lin in _linears(model)],
                  **{kind: [f"{prefix}_{layer}" in state for layer in LAYERS] for kind, prefix in _MASKS}},
        "loss": {"component_names": list(COMPONENT_NAMES), "active": list(loss._on),
                 "lambdas": [float(v) for v in loss.lambdas.detach().cpu().double()]},
        "state_dict": state,
    }


def save_native(loss: RNNLoss, path: Union[str, Path], metadata: Optional[str] = None) -> None:
    """Write ``loss`` and its model to ``path`` in the format of the module docstring (plus a ``metadata``
    string: the export's description, which readers that do not know it ignore)."""
    if not isinstance(loss, RNNLoss):
        raise TypeError(f"loss must be an RNNLoss, got {type(loss).__name__}")
    if loss.sync_stats:
        raise ValueError("save_native: the native C++ loss has no sync_stats; build the loss with sync_stats=False")
    loss.check_lambdas()  # a file that load_native would refuse is not written
    payload = native_payload(loss)
    if metadata is not None:
        payload["metadata"] = metadata
    torch.save(payload, str(path))


def _check_sizes(dims: Sequence[int], state: Dict[str, torch.Tensor], where: str) -> None:
    """The declared dims against the stored weights, before anything is allocated."""
    if not (isinstance(dims, (list, tuple)) and len(dims) == 3
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims)):
        raise NotAnRNNLossFile(f"{where}: model.dims must be three positive ints, got {dims!r}")
    n_in, n_hid, n_out = dims
    expected = {"recurrent_layer.input_layer.weight": [n_hid, n_in],
                "recurrent_layer.hidden_layer.weight": [n_hid, n_hid], "readout_layer.weight": [n_out, n_hid]}
    for key, shape in expected.items():
        got = state.get(key)
        if not isinstance(got, torch.Tensor) or list(got.shape) != shape:
            raise NotAnRNNLossFile(f"{where}: model.dims {list(dims)} needs {key} of shape {shape}, got "
                                   f"{list(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}")


def rebuild(active: Sequence[bool], dtype: Optional[torch.dtype], dims: Sequence[int], **options: Any) -> RNNLoss:
    """A fresh eager loss to load a recorded loss's state into: ``CTRNN(dims, **options)`` in ``dtype`` inside
    an :class:`RNNLoss` whose ``active`` components have λ = 1 (the recorded λ load afterwards; λ = 1 keeps a
    component annealed to 0 before saving active)."""
    model = CTRNN(tuple(dims), **options)
    if dtype is not None:
        model = model.to(dtype)
    return RNNLoss(model, **{name: (1.0 if on else 0.0) for name, on in zip(LAMBDA_NAMES, active)})


def load_native(path: Union[str, Path]) -> RNNLoss:
    """An eager :class:`RNNLoss` (its model as ``.model``, in eval mode) from a file written by
    :func:`save_native`; the state loads strictly. Raises :class:`NotAnRNNLossFile` (a ValueError) naming
    what is wrong, before building anything, when the file is not this format."""
    _check_regular(path)
    try:
        with warnings.catch_warnings():  # (torch warns before it refuses a TorchScript archive)
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's texts run to many lines; the first says what it is
        raise NotAnRNNLossFile(f"{path} is not an {FORMAT} file (torch.load: {_first_line(e)})") from None
    try:
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise NotAnRNNLossFile(f"{path} is not an {FORMAT} file")
        if payload.get("version") != VERSION:
            raise NotAnRNNLossFile(f"{path} has format version {payload.get('version')!r}; this package reads "
                                   f"version {VERSION}")
        m, spec, state = payload["model"], payload["loss"], payload["state_dict"]
        if list(spec["component_names"]) != list(COMPONENT_NAMES):
            raise NotAnRNNLossFile(f"{path} names the components {spec['component_names']}, not "
                                   f"{list(COMPONENT_NAMES)}")
        active = spec["active"]
        if not (isinstance(active, list) and len(active) == 7 and all(isinstance(a, bool) for a in active)):
            raise NotAnRNNLossFile(f"{path}: loss.active must be 7 bools, got {active!r}")
        _check_sizes(m["dims"], state, str(path))
        floats = [t for t in state.values() if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())]
        if any(t.dtype != floats[0].dtype or t.is_complex() for t in floats):
            raise NotAnRNNLossFile(f"{path}: the state's floating-point tensors must share one real dtype")
        masks = {kind: [state[f"{prefix}_{layer}"] if m[kind][k] else None for k, layer in enumerate(LAYERS)]
                 for kind, prefix in _MASKS}
        loss = rebuild(active, state["recurrent_layer.hidden_layer.weight"].dtype, m["dims"],
                       biases=[_BIAS_SPEC[kind] for kind in m["biases"]], **{k: m[k] for k in _OPTIONS}, **masks)
        lambdas = torch.tensor(spec["lambdas"], dtype=torch.float64)
        loss.model.load_state_dict(state, strict=True)
        loss.load_state_dict({"lambdas": lambdas}, strict=False)
    except (KeyError, TypeError, IndexError, AttributeError, ValueError, RuntimeError) as e:
        if isinstance(e, NotAnRNNLossFile):
            raise
        raise NotAnRNNLossFile(f"{path} is not a well-formed {FORMAT} file ({type(e).__name__}: "
                               f"{_first_line(e)})") from None
    return loss.eval()


def _first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's text on one line, cut at ``limit`` characters (torch's run to paragraphs)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _check_regular(path) -> None:
    if not is_plain_file(Path(path), follow_links=True):
        raise NotAnRNNLossFile(f"{path} is not a regular file" if os.path.lexists(path) else f"{path} does not exist")


def load_scripted(path: Union[str, Path], map_location=None) -> torch.jit.ScriptModule:
    """``torch.jit.load``, refusing first (without running it) an archive whose code defines ``__setstate__``:
    loading runs that code, and no module of this package has one, so loading stays bounded."""
    _check_regular(path)
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if not name.endswith(".py"):
                    continue
                with archive.open(name) as entry:  # read at most CODE_LIMIT + 1 bytes, whatever the zip claims
                    code = entry.read(CODE_LIMIT + 1)
                if len(code) > CODE_LIMIT:
                    raise NotAnRNNLossFile(f"{path}: {name} holds more than {CODE_LIMIT >> 20} MiB of code; an "
                                           "rnnloss export holds a few hundred KiB")
                if re.search(rb"def\s+__setstate__\b", code):
                    raise NotAnRNNLossFile(f"{path} defines __setstate__ ({name}); rnnloss never writes one, and "
                                           "loading would run it")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError) as e:
        raise NotAnRNNLossFile(f"{path} is not a TorchScript archive ({_first_line(e)})") from None
    try:
        return torch.jit.load(str(path), map_location=map_location)
    except RuntimeError as e:
        raise NotAnRNNLossFile(f"{path}: torch.jit.load failed ({_first_line(e)})") from None


def from_torchscript(source: Union[str, Path, torch.jit.ScriptModule]) -> RNNLoss:
    """The eager loss (its model as ``.model``) holding the state of a scripted loss or train module.

    ``source`` is a path to ``rnn_loss.pt``, ``ctrnn_train.pt`` or a module trained from it (for example
    ``train_ctrnn``'s ``--out`` file), or such a module already loaded. The state (weights, biases, masks,
    λ) loads with ``strict=True``; the result is on the CPU, in the scripted module's dtype and mode.
    Anything that is not an rnnloss export is refused in one line naming what is missing."""
    module = source if isinstance(source, torch.jit.ScriptModule) else load_scripted(source, "cpu")
    scripted = module.loss if hasattr(module, "loss") else module  # ctrnn_train.pt wraps the loss
    needed = ("model", "component_names", "_on", "lambdas")
    missing = [a for a in needed if not hasattr(scripted, a)]
    sm = getattr(scripted, "model", None)
    missing += [f"model.{a}" for a in ("n_in", "n_hid", "n_out", "tau", "dt", "activation", "recurrent_layer",
                                       "readout_layer") if sm is not None and not hasattr(sm, a)]
    if missing:
        raise NotAnRNNLossFile(f"{source} is not an rnnloss TorchScript module: it has no {', '.join(missing)}")
    if list(scripted.component_names) != list(COMPONENT_NAMES):
        raise NotAnRNNLossFile(f"{source}'s component_names {list(scripted.component_names)} are not "
                               f"{list(COMPONENT_NAMES)}: it was saved by another version of rnnloss")
    state = {k: v.detach().cpu() for k, v in sm.state_dict().items()}
    _check_sizes([sm.n_in, sm.n_hid, sm.n_out], state, str(source))
    masks: Dict[str, Optional[List[Optional[torch.Tensor]]]] = {}
    for kind, prefix in _MASKS:
        given = [state.get(f"{prefix}_{layer}") for layer in LAYERS]
        masks[kind] = None if all(m is None for m in given) else given
    loss = rebuild(tuple(scripted._on), state["recurrent_layer.hidden_layer.weight"].dtype,
                   (sm.n_in, sm.n_hid, sm.n_out), biases=[_bias_spec(lin) for lin in _linears(sm)], weights="zero",
                   **{k: getattr(sm, k) for k in _OPTIONS}, **masks)
    loss.load_state_dict({k: v.detach().cpu() for k, v in scripted.state_dict().items()}, strict=True)
    return loss.train(module.training)
