"""The module ``ctrnn_train.pt`` holds: model + loss in one forward, for training loops in C++."""
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .loss import RNNLoss


class CTRNNTrainer(nn.Module):
    """``forward(x, target, mask=None) -> (total, components, output, states)`` of ``loss.model``
    and ``loss``; ``mask`` (optional) weights the task error as in ``RNNLoss.forward``.

    It holds only the loss (which holds the model), so ``parameters()`` are exactly the model's,
    each once — hand them to any optimizer. ``enforce_constraints()`` and ``set_lambda(name, value)``
    are exported for scripted (C++) loops; the λ buffer is ``loss.lambdas``.

    It starts in the loss's mode (``training`` of the wrapper equals ``loss.training``), so a
    wrapper of an eval-mode loss is in eval mode throughout, top-level module included.
    """

    def __init__(self, loss: RNNLoss) -> None:
        super().__init__()
        self.loss = loss
        self.training = loss.training

    def forward(self, x: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        output, states = self.loss.model(x)
        total, components = self.loss(output, target, states, mask)
        return total, components, output, states

    @torch.jit.export
    def enforce_constraints(self) -> None:
        self.loss.model.enforce_constraints()

    @torch.jit.export
    def dims(self) -> List[int]:
        """[N_in, N_hid, N_out] of the model, for C++ code that builds inputs."""
        return [self.loss.model.n_in, self.loss.model.n_hid, self.loss.model.n_out]

    @torch.jit.export
    def is_batch_first(self) -> bool:
        """True when x, target, output and states are (B, T, ·) rather than (T, B, ·)."""
        return self.loss.model.batch_first

    @torch.jit.export
    def set_lambda(self, name: str, value: Union[float, int, bool]) -> None:
        self.loss.set_lambda(name, value)
