"""Back from TorchScript to eager: an :class:`RNNLoss` (and its :class:`CTRNN`) from a scripted file.

A module trained through ``ctrnn_train.pt`` — in C++ (``train_ctrnn``) or with a Python optimizer
on the loaded file — carries the same state_dict keys as the eager modules, so its state loads
strictly; this module rebuilds the eager objects it loads into from what the scripted module
records (dims, τ, dt, activation, noise, biases, masks, initial state, learnable α, active
components) and returns them with the trained state.
"""
from pathlib import Path
from typing import List, Optional, Union

import torch

from .loss import COMPONENT_NAMES, RNNLoss
from .model import LAYERS
from .native import rebuild

Source = Union[str, Path, torch.jit.ScriptModule]


def _linear_bias(linear) -> Union[bool, None]:
    """The constructor's bias spec that recreates ``linear``'s bias: False (none), None (fixed zero)
    or True (trained; its value comes from the state_dict)."""
    bias = linear.bias
    if bias is None:
        return False
    return True if bias.requires_grad else None


def _masks(state, kind: str) -> Optional[List[Optional[torch.Tensor]]]:
    masks = [state.get(f"{kind}_{layer}") for layer in LAYERS]
    return None if all(m is None for m in masks) else masks


def from_torchscript(source: Source) -> RNNLoss:
    """The eager loss (its model as ``.model``) holding the state of a scripted loss or train module.

    ``source`` is a path to ``rnn_loss.pt``, ``ctrnn_train.pt`` or a module trained from it (for
    example ``train_ctrnn``'s ``--out`` file), or such a module already loaded. The state
    (weights, biases, masks, λ) is loaded with ``load_state_dict(strict=True)``; the result is on
    the CPU, in the scripted module's dtype and training mode. Use ``.model`` for the CTRNN alone.
    """
    module = source if isinstance(source, torch.jit.ScriptModule) else torch.jit.load(str(source), map_location="cpu")
    scripted_loss = module.loss if hasattr(module, "loss") else module  # ctrnn_train.pt wraps the loss
    sm = scripted_loss.model
    state = {k: v.detach().cpu() for k, v in sm.state_dict().items()}
    layers = (sm.recurrent_layer.input_layer, sm.recurrent_layer.hidden_layer, sm.readout_layer)
    loss = rebuild(tuple(scripted_loss._on), state["recurrent_layer.hidden_layer.weight"].dtype,
                   (sm.n_in, sm.n_hid, sm.n_out), tau=sm.tau, dt=sm.dt, activation=sm.activation,
                   preact_noise=sm.preact_noise, postact_noise=sm.postact_noise,
                   biases=[_linear_bias(lin) for lin in layers], weights="zero",
                   sparsity_masks=_masks(state, "sparsity"), ei_masks=_masks(state, "sign"),
                   plasticity_masks=_masks(state, "plasticity"), init_state=sm.init_state,
                   learn_alpha=sm.learn_alpha, batch_first=sm.batch_first)
    if list(scripted_loss.component_names) != list(COMPONENT_NAMES):
        raise ValueError(f"source's component_names {list(scripted_loss.component_names)} are not "
                         f"{list(COMPONENT_NAMES)}: it was saved by another version of rnnloss")
    loss.load_state_dict({k: v.detach().cpu() for k, v in scripted_loss.state_dict().items()}, strict=True)
    return loss.train(module.training)
